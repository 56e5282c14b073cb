"""Repair numbers that are not numbers (NaN, Infinity), stored before request bodies were checked for them.

Python's JSON reads `Infinity` and `NaN`, and SQLite stored them as given (PostgreSQL's json type refuses them, so
there is nothing to repair there; the scan is the same on both). A job asking for infinite CPUs made a node's free
CPUs inf - inf = NaN, after which no job of any queue started there, and it came back at every restart.

- A waiting job (pending, or admitted but not launched) with such a number is rejected, with a reason that says
  which field held what; its admitted attempt, if any, ends as never started.
- Every job's spec gets CPUs and memory of 0 (not accounted) and other such numbers null (max_runtime: none) in
  their place, so that stored specs validate; a running job runs on.
- Model versions lose metrics that are not finite numbers (a gate cannot compare them). Each such repair is also
  appended to the model audit chain as a `version.repair` entry (the version's metrics as they now are, and the
  names removed), so `models audit --verify` replays it instead of reporting a version changed outside the registry.

Each repair is written to the audit log (actor "corral", action "repair.non_finite"), with the values removed.

The chain's hashing (canonical JSON, sha256 over the previous hash) is copied below, not imported from
scheduler.registry.audit: a migration must compute what it computed on the day it was written, whatever that module
becomes. tests/test_attack_repair.py checks that the copy and the module agree.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

ACTOR = "corral"
ACTION = "repair.non_finite"
WAITING = ("pending", "starting")
AMOUNTS = ("cpus", "memory_gb")  # 0 means "not accounted", the value a request without them has

jobs = sa.table(
    "jobs",
    sa.column("id", sa.Integer),
    sa.column("state", sa.String),
    sa.column("spec", sa.JSON),
    sa.column("ended_at", sa.Float),
    sa.column("reason", sa.JSON),
)
attempts = sa.table(
    "attempts",
    sa.column("job_id", sa.Integer),
    sa.column("attempt", sa.Integer),
    sa.column("state", sa.String),
    sa.column("ended_at", sa.Float),
    sa.column("outcome", sa.String),
)
events = sa.table(
    "events",
    sa.column("at", sa.Float),
    sa.column("job_id", sa.Integer),
    sa.column("kind", sa.String),
    sa.column("message", sa.Text),
    sa.column("data", sa.JSON),
)
audit = sa.table(
    "audit",
    sa.column("at", sa.Float),
    sa.column("actor", sa.String),
    sa.column("action", sa.String),
    sa.column("target", sa.String),
    sa.column("detail", sa.JSON),
)
model_versions = sa.table(
    "model_versions", sa.column("model", sa.String), sa.column("version", sa.Integer), sa.column("metrics", sa.JSON)
)
model_audit = sa.table(
    "model_audit",
    sa.column("seq", sa.Integer),
    sa.column("at", sa.Float),
    sa.column("actor", sa.String),
    sa.column("action", sa.String),
    sa.column("model", sa.String),
    sa.column("detail", sa.JSON),
    sa.column("prev_hash", sa.String),
    sa.column("hash", sa.String),
)
GENESIS = "0" * 64
REPAIR = "version.repair"


def chain_hash(prev_hash: str, entry: dict[str, Any]) -> str:
    """scheduler.registry.audit.entry_hash as of this migration (frozen): sha256 over the previous hash, a newline
    and the entry's fields as canonical JSON (sorted keys, no spaces, ASCII, no NaN)."""
    fields = {k: entry[k] for k in ("seq", "at", "actor", "action", "model", "detail")}
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(prev_hash.encode("ascii") + b"\n" + text.encode("ascii")).hexdigest()


def append_repair(conn: sa.Connection, now: float, model: str, detail: dict[str, Any]) -> None:
    """Append a `version.repair` entry after the chain's newest one, linked and hashed as the registry does."""
    last = conn.execute(
        sa.select(model_audit.c.seq, model_audit.c.hash).order_by(model_audit.c.seq.desc()).limit(1)
    ).first()
    seq, prev = (1, GENESIS) if last is None else (int(last[0]) + 1, str(last[1]))
    entry: dict[str, Any] = {"seq": seq, "at": now, "actor": ACTOR, "action": REPAIR, "model": model, "detail": detail}
    conn.execute(model_audit.insert().values(**entry, prev_hash=prev, hash=chain_hash(prev, entry)))


def _bad(v: Any) -> bool:
    return isinstance(v, float) and not math.isfinite(v)


def _shown(v: float) -> str:
    return "NaN" if math.isnan(v) else "Infinity" if v > 0 else "-Infinity"


def repaired(value: Any, path: str = "") -> tuple[Any, dict[str, str]]:
    """`value` with every non-finite number replaced (CPUs and memory by 0, anything else by None), and what was
    replaced: path -> NaN/Infinity/-Infinity."""
    if _bad(value):
        top = path.split(".")[0]
        return (0.0 if top in AMOUNTS and path == top else None), {path: _shown(value)}
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        found: dict[str, str] = {}
        for k, v in value.items():
            out[k], more = repaired(v, f"{path}.{k}" if path else str(k))
            found |= more
        return out, found
    if isinstance(value, list):
        items = [repaired(v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(value)]
        return [v for v, _ in items], {k: s for _, f in items for k, s in f.items()}
    return value, {}


def upgrade() -> None:
    conn = op.get_bind()
    now = time.time()
    for row in conn.execute(sa.select(jobs.c.id, jobs.c.state, jobs.c.spec)).mappings().all():
        spec, found = repaired(row["spec"])
        if not found:
            continue
        what = ", ".join(f"{k} = {v}" for k, v in sorted(found.items()))
        values: dict[str, Any] = {"spec": spec}
        if row["state"] in WAITING:
            message = (
                f"rejected by migration 0007: its spec asked for {what}, which is not a number; submit it "
                "again with finite values"
            )
            values |= {
                "state": "rejected",
                "ended_at": now,
                "reason": {"rule": "invalid_spec", "message": message, "numbers": {}},
            }
            conn.execute(
                attempts.update()
                .where(attempts.c.job_id == row["id"], attempts.c.state == "starting")
                .values(state="ended", ended_at=now, outcome="never_started")
            )
            conn.execute(events.insert().values(at=now, job_id=row["id"], kind="rejected", message=message, data={}))
        conn.execute(jobs.update().where(jobs.c.id == row["id"]).values(**values))
        conn.execute(
            audit.insert().values(
                at=now,
                actor=ACTOR,
                action=ACTION,
                target=f"job {row['id']}",
                detail={"replaced": found, "state": row["state"], "rejected": row["state"] in WAITING},
            )
        )
    for row in conn.execute(sa.select(model_versions)).mappings().all():
        metrics = row["metrics"] if isinstance(row["metrics"], dict) else {}
        removed = {k: _shown(v) for k, v in metrics.items() if _bad(v)}
        if not removed:
            continue
        kept = {k: v for k, v in metrics.items() if k not in removed}
        conn.execute(
            model_versions.update()
            .where(model_versions.c.model == row["model"], model_versions.c.version == row["version"])
            .values(metrics=kept)
        )
        append_repair(
            conn,
            now,
            row["model"],
            {"version": row["version"], "metrics": kept, "removed_metrics": removed, "by": "migration 0007"},
        )
        conn.execute(
            audit.insert().values(
                at=now,
                actor=ACTOR,
                action=ACTION,
                target=f"model {row['model']} version {row['version']}",
                detail={"removed_metrics": removed},
            )
        )


def downgrade() -> None:
    # The values replaced were never numbers; there is nothing to put back.
    pass
