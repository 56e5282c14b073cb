"""Admission policies in the service: the policy in force, its versions (apply, history, rollback, each audited)
and `check`, which every submission and sandbox spawn passes through inside the intake.

Only platform admins apply policies: the rules are guardrails over every team, and a team admin who could
change them could loosen its own. Every caller may read the policy and test a job against it.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, RowMapping

from scheduler.admission import hook as admission_hook
from scheduler.admission.rules import (
    HOOK,
    AdmissionError,
    AdmissionPolicy,
    Decision,
    HookAnswer,
    evaluate,
    parse,
)
from scheduler.service.api.auth import Principal
from scheduler.service.api.errors import Conflict, Forbidden, Invalid, NotFound
from scheduler.service.core.interfaces import Admits
from scheduler.service.core.specs import JobSubmit
from scheduler.service.store import rows as store
from scheduler.service.store.db import admission_policies


def latest(conn: Connection) -> RowMapping | None:
    q = sa.select(admission_policies).order_by(admission_policies.c.version.desc()).limit(1)
    return conn.execute(q).mappings().first()


def version(conn: Connection, number: int) -> RowMapping | None:
    q = sa.select(admission_policies).where(admission_policies.c.version == number)
    return conn.execute(q).mappings().first()


def history(conn: Connection) -> list[dict[str, Any]]:
    rows = conn.execute(sa.select(admission_policies).order_by(admission_policies.c.version)).mappings()
    return [dict(r) for r in rows]


def current(core: Admits) -> tuple[int, AdmissionPolicy]:
    """(version, policy) in force; (0, no rules) before the first apply. Kept by the service (core.policy), so a
    submission does not read the database for it. Every change goes through `apply` here, under the core's lock,
    which replaces it whole: it cannot go stale within a process."""
    found = core.policy
    if found is not None:  # every submission asks: no lock once known (apply replaces it whole)
        return found
    with core.lock:
        found = core.policy
        if found is None:
            with core.db.connect() as conn:
                row = latest(conn)
            # A stored document was valid when applied; parse it again rather than trust the JSON's shape.
            found = (0, AdmissionPolicy()) if row is None else (row["version"], parse(row["document"]))
            core.policy = found
        return found


def validate(core: Admits, document: dict[str, Any]) -> AdmissionPolicy:
    """The whole document checked; Invalid lists every problem with where it is."""
    try:
        policy = parse(document, set(core.tree.queues))  # every problem at once, unknown queues included
    except AdmissionError as e:
        raise Invalid(str(e), e.problems[0][0], [{"where": w, "problem": p} for w, p in e.problems]) from e
    return policy


def diff(old: AdmissionPolicy, new: AdmissionPolicy) -> list[dict[str, Any]]:
    """Rules added, removed or changed (by name), and the hook if it changed."""
    before = {r.name: r.model_dump(exclude_defaults=True) for r in old.rules}
    after = {r.name: r.model_dump(exclude_defaults=True) for r in new.rules}
    out: list[dict[str, Any]] = []
    for name in sorted(before.keys() | after.keys()):
        b, a = before.get(name), after.get(name)
        if b != a:
            change = "added" if b is None else "removed" if a is None else "changed"
            out.append({"rule": name, "change": change, "before": b, "after": a})
    if old.hook != new.hook:
        out.append(
            {
                "rule": "hook",
                "change": "changed",
                "before": None if old.hook is None else old.hook.model_dump(exclude_defaults=True),
                "after": None if new.hook is None else new.hook.model_dump(exclude_defaults=True),
            }
        )
    return out


def apply(
    core: Admits,
    who: Principal,
    document: dict[str, Any],
    comment: str = "",
    dry_run: bool = False,
    expected_version: int | None = None,
) -> dict[str, Any]:
    """Validate, then store as a new version (history only grows) and put it in force at once. With
    `expected_version`, refuse (409) if another apply came first, so the diff shown is the one made."""
    if not who.admin:
        raise Forbidden(f"{who.user} ({who.role}) may not change admission policies: platform admins only")
    with core.lock:
        policy = validate(core, document)
        number, old = current(core)
        if expected_version is not None and number != expected_version:
            raise Conflict(
                f"the admission policy is at version {number}, not {expected_version}: someone applied "
                "a change since; look at the diff again",
                "expected_version",
            )
        changes = diff(old, policy)
        out: dict[str, Any] = {"version": number, "diff": changes, "applied": False}
        if dry_run or (not changes and number > 0):
            return out
        now = core.clock()
        with core.db.begin() as conn:
            out["version"] = conn.execute(
                admission_policies.insert()
                .values(author=who.user, created_at=now, comment=comment, document=document)
                .returning(admission_policies.c.version)
            ).scalar_one()
            store.add_audit(
                conn,
                now,
                who.user,
                "admission.apply",
                f"admission policy version {out['version']}",
                comment=comment,
                diff=changes,
            )
        core.policy = (out["version"], policy)
        out["applied"] = True
    return out


def rollback(core: Admits, who: Principal, number: int) -> dict[str, Any]:
    """Apply an earlier version again, as a new version."""
    with core.db.connect() as conn:
        old = version(conn, number)
    if old is None:
        raise NotFound(f"admission policy version {number} not found")
    return apply(core, who, old["document"], f"rollback to version {number}")


def decide(core: Admits, who: Principal, sub: JobSubmit) -> tuple[int, Decision]:
    """What the policy in force does to `sub` (its queue must exist)."""
    number, policy = current(core)
    path = [q.name for q in core.tree[sub.queue].path]
    runner = None
    if policy.hook is not None:
        the_hook = policy.hook

        def runner(request: dict[str, Any]) -> HookAnswer:
            return admission_hook.run(the_hook, request)

    return number, evaluate(policy, sub, path, runner, who.user)


def check(core: Admits, who: Principal, sub: JobSubmit) -> JobSubmit:
    """The submission as the policy has it (defaults filled in), or Invalid naming the rule and the value.
    Rejections and changes are audited here: a rejected job leaves no other trace."""
    number, d = decide(core, who, sub)
    if d.allowed and not d.applied:
        return d.job
    now = core.clock()
    target = f"queue {sub.queue}"
    with core.db.begin() as conn:
        if d.applied:
            store.add_audit(
                conn,
                now,
                who.user,
                "admission.mutate",
                target,
                policy_version=number,
                job=sub.name,
                kind=sub.kind,
                applied=[{"rule": r, "change": w} for r, w in d.applied],
            )
        if d.rejected is not None:
            r = d.rejected
            store.add_audit(
                conn,
                now,
                who.user,
                "admission.reject",
                target,
                policy_version=number,
                job=sub.name,
                kind=sub.kind,
                rule=r.rule,
                field=r.field,
                value=r.value,
                message=r.message,
            )
    if d.rejected is not None:
        r = d.rejected
        raise Invalid(
            f"admission policy: {r.message}" if r.rule != HOOK else f"admission hook: {r.message}",
            r.field or None,
            {"rule": r.rule, "field": r.field, "value": r.value, "policy_version": number},
        )
    return d.job


def preview(core: Admits, who: Principal, sub: JobSubmit) -> dict[str, Any]:
    """The decision for `sub` without submitting it (the hook does run: it is part of the answer)."""
    if not who.covers(core.tree, sub.queue):
        raise Forbidden(f"{who.user} ({who.role}) may not use queue {sub.queue}", "queue")
    if sub.queue not in core.tree:
        raise Invalid(f"queue {sub.queue!r} does not exist", "queue")
    with core.lock:
        number, d = decide(core, who, sub)
    return {"policy_version": number, **d.json()}
