"""No secret reaches a log line, an event, the audit log or an answer: API tokens, job environments, the
database password; with every logger at DEBUG (SQL statements included) and through a database error."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from scheduler.service.api.auth import Role
from scheduler.service.store.db import audit, connect, events, jobs
from tests.service_kit import make_service


@pytest.fixture
def url_with_password(db_url: str) -> Iterator[tuple[str, str | None]]:
    """The test database, reached (on PostgreSQL) as a role with a password: (URL, password or None)."""
    if db_url.startswith("sqlite"):
        yield db_url, None
        return
    password, role = f"pw-{uuid.uuid4().hex}", f"corral_{uuid.uuid4().hex[:8]}"
    owner = sa.create_engine(db_url, isolation_level="AUTOCOMMIT")
    with owner.connect() as conn:
        conn.execute(sa.text(f"CREATE ROLE {role} LOGIN SUPERUSER PASSWORD '{password}'"))
    try:
        yield (
            sa.engine.make_url(db_url).set(username=role, password=password).render_as_string(hide_password=False),
            password,
        )
    finally:
        with owner.connect() as conn:
            conn.execute(sa.text(f"REASSIGN OWNED BY {role} TO CURRENT_USER"))
            conn.execute(sa.text(f"DROP OWNED BY {role}"))
            conn.execute(sa.text(f"DROP ROLE {role}"))
        owner.dispose()


def test_no_secret_in_logs_events_audit_or_answers(
    url_with_password: tuple[str, str | None], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url, db_password = url_with_password
    caplog.set_level(logging.DEBUG)  # every logger, SQLAlchemy's statements among them
    logging.getLogger("sqlalchemy.engine").setLevel(logging.INFO)
    svc = make_service(url, tmp_path)
    member = svc.client("ada", Role.MEMBER, "nlp")
    env_secret, key_secret = f"hf_{uuid.uuid4().hex}", f"wb_{uuid.uuid4().hex}"
    r = member.post(
        "/v1/jobs",
        json={
            "name": "train",
            "queue": "nlp",
            "gpus": 1,
            "command": ["python", "t.py"],
            "env": {"HF_TOKEN": env_secret, "WANDB_API_KEY": key_secret, "EPOCHS": "3"},
        },
    )
    assert r.status_code == 201, r.text
    job = r.json()["id"]
    svc.tick()
    assert svc.executor.launched[-1].env["HF_TOKEN"] == env_secret  # the job itself gets it
    answers = [
        member.get(p).text for p in (f"/v1/jobs/{job}", "/v1/jobs", f"/v1/jobs/{job}/events", f"/v1/jobs/{job}/explain")
    ]
    assert '"EPOCHS":"3"' in answers[0].replace(" ", "")  # other values are shown
    made = svc.admin.post("/v1/tokens", json={"user": "bob", "role": "viewer", "scope": "nlp"}).json()["token"]
    viewer = TestClient(svc.admin.app, headers={"Authorization": f"Bearer {made}"})
    assert viewer.get("/v1/jobs").status_code == 200
    wrong = f"not-a-token-{uuid.uuid4().hex}"
    assert TestClient(svc.admin.app, headers={"Authorization": f"Bearer {wrong}"}).get("/v1/jobs").status_code == 401
    # A database error whose statement carried a secret: the error's text names no parameter.
    with pytest.raises(sa.exc.IntegrityError) as failed, svc.core.db.begin() as conn:
        conn.execute(
            jobs.insert().values(
                id=job,
                name="dup",
                owner="ada",
                queue="nlp",
                pool="local",
                state="pending",
                spec={"env": {"HF_TOKEN": env_secret}},
                gpus=1,
                priority=0,
                submitted_at=0.0,
                attempt=0,
            )
        )
    logging.getLogger("test").error("insert failed: %s", failed.value)

    with svc.core.db.connect() as conn:
        stored = [str(row) for t in (events, audit) for row in conn.execute(sa.select(t))]
    secrets = {
        "job environment": env_secret,
        "API key": key_secret,
        "wrong token": wrong,
        "made token": made,
        "member token": member.headers["Authorization"].split()[1],
    }
    if db_password:
        secrets["database password"] = db_password
    assert any("INSERT INTO jobs" in r.getMessage() for r in caplog.records)  # SQL logging was really on
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for what, secret in secrets.items():
        assert secret not in logged, f"{what} in a log line"
        assert not any(secret in s for s in stored), f"{what} in an event or the audit log"
        if what != "made token":  # shown once, in the answer that made it
            assert not any(secret in a for a in answers), f"{what} in an API answer"


def test_a_database_error_does_not_carry_its_parameters(tmp_path: Path) -> None:
    db = connect(f"sqlite:///{tmp_path / 'x.db'}")
    with db.begin() as conn:
        conn.execute(sa.text("CREATE TABLE t (k TEXT PRIMARY KEY)"))
        conn.execute(sa.text("INSERT INTO t VALUES (:k)"), {"k": "the-secret"})
    with pytest.raises(sa.exc.IntegrityError) as failed, db.begin() as conn:
        conn.execute(sa.text("INSERT INTO t VALUES (:k)"), {"k": "the-secret"})
    assert "the-secret" not in str(failed.value)
