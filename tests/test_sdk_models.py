"""The SDK's model registry (notebooks.models) against a live `corral serve`: versions registered from jobs that
really ran, promotions under the default policy (staging: no gates but the digest; production: one approval from
a model owner other than the requester), rollback, audit, manifests and ROI."""

from __future__ import annotations

import asyncio
import shlex
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from notebooks.aio import AsyncCorral
from notebooks.client import Client, Job
from notebooks.config import Connection
from notebooks.errors import CorralError
from notebooks.models import AsyncModels
from tests.marks import starts_processes
from tests.test_sdk import QUICK, LiveCorral, start_corral


@pytest.fixture(scope="module")
@starts_processes
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveCorral]:
    yield from start_corral(tmp_path_factory.mktemp("corral-models"))


@pytest.fixture(scope="module")
def corral(live: LiveCorral) -> Iterator[Client]:
    """The platform admin (`corral serve`'s token): it creates, registers and requests promotions."""
    with Client(live.url, live.token) as c:
        yield c


@pytest.fixture(scope="module")
def owner(live: LiveCorral) -> Iterator[Client]:
    """A second person, a model owner of the default queue, made through the API: approvals must come from
    someone other than the requester."""
    r = httpx.post(
        f"{live.url}/v1/tokens",
        json={"user": "olga", "role": "model-owner", "scope": "default"},
        headers={"Authorization": f"Bearer {live.token}"},
    )
    assert r.status_code == 201, r.text
    with Client(live.url, r.json()["token"]) as c:
        yield c


def train(corral: Client, artifact: str, content: str, exit_code: int = 0, accuracy: float = 0.9) -> Job:
    """A job that writes its 'weights' to `artifact` in its output directory, and its metrics and eval set with
    the SDK (notebooks.outputs), as a training run would, and has finished."""
    record = (
        f"from notebooks import log_metrics, record_lineage; log_metrics({{'accuracy': {accuracy}}}); "
        "record_lineage(code=None, eval_set='imdb-test')"
    )
    job = corral.submit(
        f'printf %s {shlex.quote(content)} > "$CORRAL_OUTPUT_DIR"/{shlex.quote(artifact)}; '
        f"python -c {shlex.quote(record)}; exit {exit_code}",
        queue="default",
        name="train",
    )
    try:
        job.wait(poll=QUICK)
    except CorralError:
        assert exit_code != 0
    return job


def test_from_a_finished_job_to_production_and_back(corral: Client, owner: Client, tmp_path: Path) -> None:
    corral.models.create_model("sentiment", queue="default", description="reviews")
    first = train(corral, "v1.pt", "w1", accuracy=0.91)
    v1 = corral.models.register_model("sentiment", first, "v1.pt")
    assert (v1["version"], v1["lineage"]["job"], len(v1["digest"])) == (1, first.id, 64)
    assert v1["lineage"]["recorded_by_job"] is True and v1["lineage"]["code"] is None
    shown = corral.models.model("sentiment")["versions"][0]
    assert (shown["metrics"], shown["eval_set"]) == ({"accuracy": 0.91}, "imdb-test")

    # The default policy: staging checks only the digest, so the version goes there at once.
    staged = corral.models.promote("sentiment", 1, stage="staging")
    assert staged["state"] == "promoted"
    assert [(g["gate"], g["status"]) for g in staged["gates"]] == [("digest", "pass")]

    # Production waits for one approval, and not the requester's.
    ask = corral.models.promote("sentiment", 1)
    assert ask["state"] == "open"
    assert ("approvals 0/1", "pending") in [(g["gate"], g["status"]) for g in ask["gates"]]
    with pytest.raises(CorralError) as e:
        corral.models.approve(ask["promotion"])
    assert e.value.status == 403 and "someone else" in e.value.message
    done = owner.models.approve(ask["promotion"])
    assert done["state"] == "promoted"
    assert corral.models.model("sentiment")["aliases"]["production"]["version"] == 1

    # v2 by job id, with v1's job in its lineage; then rolled back.
    second = train(corral, "v2.pt", "w2", accuracy=0.95)
    v2 = corral.models.register_model("sentiment", second.id, "v2.pt", lineage_jobs=[first])
    assert v2["version"] == 2 and v2["lineage"]["jobs"] == sorted([first.id, second.id])
    assert owner.models.approve(corral.models.promote("sentiment", 2)["promotion"])["state"] == "promoted"
    manifest = yaml.safe_load(corral.models.manifest("sentiment"))
    assert manifest["kind"] == "InferenceService"
    assert manifest["spec"]["predictor"]["model"]["storageUri"].endswith(f"/{second.id}/1/output/v2.pt")
    assert (
        yaml.safe_load(corral.models.manifest("sentiment", kind="deployment", image="me/serve:1"))["kind"]
        == "Deployment"
    )
    roi = corral.models.roi("sentiment")
    assert roi["production"]["version"] == 2 and [v["jobs"] for v in roi["versions"]] == [
        [first.id],
        sorted([first.id, second.id]),
    ]

    back = owner.models.rollback("sentiment", "production")
    assert (back["version"], back["previous"]) == (1, 2)
    assert owner.models.model("sentiment")["aliases"]["production"]["version"] == 1

    audit = owner.models.audit("sentiment", verify=True)
    assert audit["verified"]["intact"] is True
    assert [e["action"] for e in audit["entries"]][-1] == "model.rollback"
    assert "sentiment" in [m["name"] for m in corral.models.models()]


def test_errors_carry_code_and_where(corral: Client, owner: Client, tmp_path: Path) -> None:
    corral.models.create_model("m", queue="default")
    with pytest.raises(CorralError) as e:
        corral.models.create_model("m", queue="default")
    assert e.value.code == "conflict"
    failed = train(corral, "f.pt", "x", exit_code=3)
    with pytest.raises(CorralError) as e:
        corral.models.register_model("m", failed, "f.pt")
    assert (e.value.code, e.value.where) == ("invalid", "job_id") and "is failed" in e.value.message
    with pytest.raises(CorralError) as e:
        owner.models.apply_policy("m", {"stages": {"prod": {}}})
    assert "unknown stage 'prod'" in e.value.message
    with pytest.raises(CorralError) as e:
        corral.models.model("nope")
    assert e.value.status == 404


def test_async_core_on_a_running_loop(live: LiveCorral) -> None:
    async def cell() -> list[str]:
        async with AsyncCorral(Connection(live.url, live.token, "test")) as api:
            return [m["name"] for m in await AsyncModels(api).models()]

    assert isinstance(asyncio.run(cell()), list)
