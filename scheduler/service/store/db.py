"""Tables, database connections (SQLite with WAL, or PostgreSQL) and migrations to the latest schema."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.engine import Engine

metadata = sa.MetaData()
MIGRATIONS = Path(__file__).parent / "migrations"


class GpuAmount(sa.TypeDecorator[float]):
    """GPUs as stored since migration 0009: a float column, read back as an int when whole (2, not 2.0), so a
    whole-GPU job reads and answers exactly as before shares of GPUs existed; a share to a millionth."""

    impl = sa.Float
    cache_ok = True

    def process_result_value(self, value: float | None, dialect: sa.Dialect) -> float | None:
        if value is None:
            return None
        value = round(float(value), 6)
        return int(value) if value.is_integer() else value


# Times are seconds since the epoch (float): the engine's clock, and trivial to compare across databases.
queue_versions = sa.Table(
    "queue_versions",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("author", sa.String(200), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("comment", sa.Text, nullable=False, default=""),
    sa.Column("document", sa.JSON, nullable=False),  # {"queues": [...]} exactly as applied
)

# Admission policies, versioned like the queue tree: the newest row is in force.
admission_policies = sa.Table(
    "admission_policies",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("author", sa.String(200), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("comment", sa.Text, nullable=False, default=""),
    sa.Column("document", sa.JSON, nullable=False),  # {"rules": [...], "hook": ...} exactly as applied
)

nodes = sa.Table(
    "nodes",
    metadata,
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("pool", sa.String(200), nullable=False),
    sa.Column("gpus", sa.Integer, nullable=False),
    sa.Column("gpu_model", sa.String(200), nullable=False),
    sa.Column("up", sa.Boolean, nullable=False, default=True),
    sa.Column("info", sa.JSON, nullable=False),  # per GPU: index, model, memory, uuid, MIG mode
)

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("owner", sa.String(200), nullable=False),
    sa.Column("queue", sa.String(200), nullable=False, index=True),
    sa.Column("pool", sa.String(200), nullable=False),
    sa.Column("state", sa.String(20), nullable=False, index=True),
    sa.Column("spec", sa.JSON, nullable=False),
    sa.Column("gpus", GpuAmount, nullable=False),  # the whole gang: workers x GPUs per worker (a share: 0.25)
    sa.Column("priority", sa.Integer, nullable=False),
    sa.Column("idempotency_key", sa.String(200), nullable=True),
    sa.Column("submitted_at", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float, nullable=True),  # first start: wait time ends here
    sa.Column("ended_at", sa.Float, nullable=True),
    sa.Column("attempt", sa.Integer, nullable=False, default=0),  # current (latest) attempt, 0: never started
    sa.Column("exit_code", sa.Integer, nullable=True),
    sa.Column("reason", sa.JSON, nullable=True),  # the engine's last Reason: rule, message, numbers
    # When a younger job first overtook this pending job (its starvation-guard clock); None: never, or started
    # since. Stored so that a rebuilt engine reserves for the same job at the same time (docs/service.md).
    sa.Column("overtaken_at", sa.Float, nullable=True),
    sa.UniqueConstraint("owner", "idempotency_key", name="uq_jobs_owner_idempotency_key"),
    # A user's own jobs newest first (the job list of a scoped caller) without sorting all of them.
    sa.Index("ix_jobs_owner_id", "owner", "id"),
)

# One row per start of a job: where it ran, which process, and when it held its GPUs (usage comes from here).
attempts = sa.Table(
    "attempts",
    metadata,
    sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id"), primary_key=True),
    sa.Column("attempt", sa.Integer, primary_key=True),
    # starting: admitted, not launched yet; running; stopping: asked to stop, process still alive; ended.
    sa.Column("state", sa.String(20), nullable=False, index=True),
    sa.Column("placement", sa.JSON, nullable=False),  # node -> GPU indices
    sa.Column("gpus", GpuAmount, nullable=False),
    sa.Column("pid", sa.Integer, nullable=True),
    sa.Column("proc_started", sa.Float, nullable=True),
    sa.Column("admitted_at", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float, nullable=True),  # process launched: GPUs physically held from here
    sa.Column("ended_at", sa.Float, nullable=True),
    sa.Column("stop_deadline", sa.Float, nullable=True),
    sa.Column("exit_code", sa.Integer, nullable=True),
    sa.Column("outcome", sa.String(40), nullable=True),  # completed, failed, preempted, cancelled, ...
    # The attempt's place in the order of all admissions (grows by one per admission): a rebuilt engine restores
    # running jobs in this order, which breaks its ties between victims admitted at the same instant.
    sa.Column("admission", sa.Integer, nullable=True),
)

leadership = sa.Table(  # one row (id 1): the fencing token of high availability (scheduler/service/core/leader.py)
    "leadership",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("epoch", sa.Integer, nullable=False),
    sa.Column("holder", sa.String(200), nullable=False),
    sa.Column("url", sa.String(500), nullable=True),
    sa.Column("since", sa.Float, nullable=False),
)

events = sa.Table(
    "events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("job_id", sa.Integer, nullable=True, index=True),
    sa.Column("kind", sa.String(40), nullable=False),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("data", sa.JSON, nullable=False),
)

tokens = sa.Table(
    "tokens",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("digest", sa.String(64), nullable=False, unique=True),  # sha256 of the secret; never the secret
    sa.Column("user", sa.String(200), nullable=False),
    sa.Column("role", sa.String(40), nullable=False),
    sa.Column("scope", sa.String(200), nullable=True),  # a queue: the role applies to its subtree; None: all
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("created_by", sa.String(200), nullable=False),
    sa.Column("revoked", sa.Boolean, nullable=False, default=False),
    sa.Column("expires_at", sa.Float, nullable=True),  # None: never (the bootstrap admin token)
)

audit = sa.Table(
    "audit",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("actor", sa.String(200), nullable=False),
    sa.Column("action", sa.String(60), nullable=False),
    sa.Column("target", sa.String(200), nullable=False),
    sa.Column("detail", sa.JSON, nullable=False),
)


# ----- the golden path: models, versions, stages, promotions, and their hash-chained audit -----

models = sa.Table(
    "models",
    metadata,
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("queue", sa.String(200), nullable=False),  # the owning team: its roles decide who may do what
    sa.Column("description", sa.Text, nullable=False, default=""),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("created_by", sa.String(200), nullable=False),
)

model_policies = sa.Table(
    "model_policies",
    metadata,
    sa.Column("model", sa.String(200), sa.ForeignKey("models.name"), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("document", sa.JSON, nullable=False),
    sa.Column("author", sa.String(200), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)

model_versions = sa.Table(
    "model_versions",
    metadata,
    sa.Column("model", sa.String(200), sa.ForeignKey("models.name"), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id"), nullable=False),
    sa.Column("lineage", sa.JSON, nullable=False),  # job, queue, command, image, code and dataset references, jobs
    sa.Column("metrics", sa.JSON, nullable=False),
    sa.Column("eval_set", sa.String(200), nullable=True),
    sa.Column("artifact_uri", sa.Text, nullable=False),
    sa.Column("digest", sa.String(64), nullable=False),  # sha256 of the artifact, computed at registration
    sa.Column("registered_at", sa.Float, nullable=False),
    sa.Column("registered_by", sa.String(200), nullable=False),
)

model_aliases = sa.Table(
    "model_aliases",
    metadata,
    sa.Column("model", sa.String(200), sa.ForeignKey("models.name"), primary_key=True),
    sa.Column("stage", sa.String(20), primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("previous", sa.Integer, nullable=True),  # what a rollback restores
    sa.Column("updated_at", sa.Float, nullable=False),
)

promotions = sa.Table(
    "promotions",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("model", sa.String(200), sa.ForeignKey("models.name"), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("stage", sa.String(20), nullable=False),
    sa.Column("requester", sa.String(200), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("state", sa.String(20), nullable=False),  # open, promoted, rejected
    sa.Column("gates", sa.JSON, nullable=False),  # the last evaluation: every gate, pass/fail/pending, evidence
    sa.Column("decided_at", sa.Float, nullable=True),
)

approvals = sa.Table(
    "approvals",
    metadata,
    sa.Column("promotion_id", sa.Integer, sa.ForeignKey("promotions.id"), primary_key=True),
    sa.Column("approver", sa.String(200), primary_key=True),
    sa.Column("at", sa.Float, nullable=False),
)

model_audit = sa.Table(
    "model_audit",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("actor", sa.String(200), nullable=False),
    sa.Column("action", sa.String(40), nullable=False),
    sa.Column("model", sa.String(200), nullable=False),
    sa.Column("detail", sa.JSON, nullable=False),
    sa.Column("prev_hash", sa.String(64), nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
)


def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
    # WAL: readers never block the writer; NORMAL sync is durable across process crashes (not power loss);
    # busy_timeout lets a second writer (a CLI, a migration) wait instead of failing at once.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


def connect(url: str) -> Engine:
    """An SQLAlchemy engine for `url` (sqlite:///path or postgresql+psycopg://...)."""
    # hide_parameters: statement parameters hold job environments (tokens, keys); they must not reach a log
    # line, with SQL logging turned on or in the text of a database error.
    if url.startswith("sqlite"):
        # A pool as large as the API's thread pool: opening a connection (and its pragmas) per request under
        # load costs more than the request.
        eng = sa.create_engine(
            url, connect_args={"check_same_thread": False}, pool_size=40, max_overflow=20, hide_parameters=True
        )
        event.listen(eng, "connect", _sqlite_pragmas)
        return eng
    return sa.create_engine(url, pool_size=40, max_overflow=20, pool_pre_ping=True, hide_parameters=True)


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def migrate(url: str) -> None:
    """Bring the database at `url` to the latest schema (creates it on first use)."""
    command.upgrade(alembic_config(url), "head")


class NotAtHead(RuntimeError):
    """The database's schema is not the one this version of Corral needs, and migrate_on_start is off."""


def head_revision() -> str:
    """The newest migration this version of Corral ships."""
    from alembic.script import ScriptDirectory  # noqa: PLC0415

    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None
    return head


def revisions() -> list[str]:
    """Every migration this version ships, oldest first."""
    from alembic.script import ScriptDirectory  # noqa: PLC0415

    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    return [s.revision for s in reversed(list(script.walk_revisions()))]


def current_revision(url: str) -> str | None:
    """The revision the database at `url` is at; None: no Corral schema yet (an empty database)."""
    from alembic.migration import MigrationContext  # noqa: PLC0415

    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def upgrade(url: str, to: str = "head") -> None:
    """Migrate the database at `url` up to revision `to` (default: the newest)."""
    command.upgrade(alembic_config(url), to)


def downgrade(url: str, to: str) -> None:
    """Migrate the database at `url` down to revision `to` (each migration's downgrade says what it drops)."""
    command.downgrade(alembic_config(url), to)


def require_head(url: str) -> None:
    """Raise NotAtHead unless the database at `url` is at this version's newest migration (migrate_on_start off:
    the chart's hook, or an operator, runs `corral db upgrade` before the service starts)."""
    current, head = current_revision(url), head_revision()
    if current != head:
        raise NotAtHead(
            f"the database is at migration {current or 'none (empty)'}, this version of Corral needs {head}, and "
            "migrate_on_start is off: run `corral db upgrade` (with the same database settings) first, or set "
            "CORRAL_MIGRATE_ON_START=true"
        )
