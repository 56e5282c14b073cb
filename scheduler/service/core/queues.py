"""Queue documents over time: the current tree, diffs between versions, and the starting trees."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from pydantic import ValidationError
from sqlalchemy.engine import Connection, RowMapping

from quotas import QueueTree, QuotaError
from scheduler.service.api.errors import Invalid
from scheduler.service.core.specs import QueueDocument
from scheduler.service.store.db import queue_versions

FIELDS = ("parent", "quota", "limit", "weight")


def default_document(capacity: Mapping[str, int]) -> dict[str, Any]:
    """A fresh install: one queue that is guaranteed every GPU, so the first job runs without any set-up."""
    return {"queues": [{"name": "default", "quota": dict(capacity)}]}


def demo_document(capacity: Mapping[str, int]) -> dict[str, Any]:
    """Two departments of two teams, sized to whatever GPUs this machine has (the README demo)."""
    # The demo runs on the first pool; other pools get no quota (the default is 0).
    pool, cap = next(iter(capacity.items()))
    half, quarter = cap // 2, cap // 4
    queues = [
        {"name": "research", "quota": {pool: half}},
        {"name": "product", "quota": {pool: cap - half}},
        {"name": "nlp", "parent": "research", "quota": {pool: quarter}, "weight": 2},
        {"name": "vision", "parent": "research", "quota": {pool: half - quarter}},
        {"name": "ranking", "parent": "product", "quota": {pool: cap - half}, "limit": {pool: cap}},
        {"name": "ads", "parent": "product", "quota": {pool: 0}},
    ]
    return {"queues": queues}


def build_tree(document: Mapping[str, Any], capacity: Mapping[str, int]) -> QueueTree:
    """Validate a document as a whole; Invalid lists every problem with where it is."""
    try:
        doc = QueueDocument.model_validate(document)
    except ValidationError as e:
        problems = [{"where": ".".join(str(p) for p in err["loc"]), "problem": err["msg"]} for err in e.errors()]
        text = "; ".join(f"{p['where']}: {p['problem']}" for p in problems)
        raise Invalid(f"the queue document is not valid: {text}", problems[0]["where"], problems) from e
    try:
        return QueueTree(doc.specs(), capacity)
    except QuotaError as e:
        raise Invalid(
            f"the queue tree cannot be applied: {e}", "queues", [{"where": w, "problem": p} for w, p in e.problems]
        ) from e


def latest(conn: Connection) -> RowMapping | None:
    q = sa.select(queue_versions).order_by(queue_versions.c.version.desc()).limit(1)
    return conn.execute(q).mappings().first()


def version(conn: Connection, number: int) -> RowMapping | None:
    return conn.execute(sa.select(queue_versions).where(queue_versions.c.version == number)).mappings().first()


def history(conn: Connection) -> list[dict[str, Any]]:
    rows = conn.execute(sa.select(queue_versions).order_by(queue_versions.c.version)).mappings()
    return [dict(r) for r in rows]


def diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[dict[str, Any]]:
    """What applying `new` over `old` changes, queue by queue: added, removed, or field: before -> after."""
    before = {q["name"]: _normal(q) for q in old.get("queues", [])}
    after = {q["name"]: _normal(q) for q in new.get("queues", [])}
    out: list[dict[str, Any]] = []
    for name in sorted(before.keys() | after.keys()):
        b, a = before.get(name), after.get(name)
        if b is None:
            out.append({"queue": name, "change": "added", "after": a})
        elif a is None:
            out.append({"queue": name, "change": "removed", "before": b})
        else:
            changed = {f: {"before": b[f], "after": a[f]} for f in FIELDS if b[f] != a[f]}
            if changed:
                out.append({"queue": name, "change": "changed", "fields": changed})
    return out


def _normal(q: Mapping[str, Any]) -> dict[str, Any]:
    d = QueueDocument.model_validate({"queues": [q]}).queues[0]
    return {"parent": d.parent, "quota": d.quota, "limit": d.limit, "weight": d.weight}
