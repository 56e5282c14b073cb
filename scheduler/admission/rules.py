"""Admission rules as data, and `evaluate`: what a policy does to one submission.

A policy is a YAML document, validated as a whole like the queue tree. Each rule applies everywhere or to
some queues and their subtrees; it may fill in defaults (mutations) and check allowed images, GPUs per job
and per sandbox, a runtime cap and required labels. `evaluate` reads no database, clock or network: the
service passes the queue's path and, when the policy has one, a function that runs its hook.

Order, so a rejection is the same whatever the rule order: every applicable rule's defaults are filled in
first (the first rule to set a field wins), then every check runs on the result, then the hook, whose
changes are checked again (a hook must not be a way around the rules).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field, ValidationError, model_validator

from scheduler.registry.policy import Hook
from scheduler.service.api.edge import Body
from scheduler.service.core.specs import JobSubmit

# Fields no rule or hook may set: they decide who may submit where, and what kind of thing this is. Changing
# them after the permission check would route around it.
FIXED = frozenset({"queue", "kind", "idempotency_key", "command"})
DICT_FIELDS = frozenset({"labels", "env"})  # defaults add missing keys; they never replace given ones


class AdmissionError(ValueError):
    """A policy document that cannot be applied; `problems` lists (where, what is wrong)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("the admission policy is not valid: " + "; ".join(f"{w}: {p}" for w, p in problems))


class Scope(Body):
    """Where a rule applies: these queues and everything below them."""

    queues: list[str] = Field(min_length=1)


class Rule(Body):
    """One named rule. Every check is optional; a rule may be only defaults."""

    name: str = Field(min_length=1, max_length=200)
    scope: Scope | None = Field(None, description="None: every queue (global).")
    allowed_images: list[str] | None = Field(None, description="Image prefixes, e.g. registry.example.com/ml/.")
    max_gpus_per_job: int | None = Field(None, ge=0, description="Workers x GPUs per worker, for jobs.")
    max_gpus_per_sandbox: int | None = Field(None, ge=0)
    max_runtime_cap_s: float | None = Field(None, gt=0, description="Unset max_runtime is set to it.")
    required_labels: list[str] = Field(default_factory=list)
    defaults: dict[str, Any] = Field(default_factory=dict, description="Job fields filled in when not given.")

    @model_validator(mode="after")
    def _defaults_are_job_fields(self) -> Rule:
        # Every problem of the rule at once, not the first one: a fix-one-retry loop is what users reported.
        problems: list[str] = []
        for f in self.defaults:
            if f in FIXED:
                problems.append(f"defaults may not set {f!r}: it decides who may submit where")
            elif f not in JobSubmit.model_fields:
                problems.append(f"defaults names {f!r}, which is not a job field")
        if self.allowed_images is not None and not all(p.strip() for p in self.allowed_images):
            problems.append("allowed_images may not contain an empty prefix (it would allow every image)")
        # A default that no job could carry (gpus: "two") is an error now, not at every submission.
        usable = {k: v for k, v in self.defaults.items() if k not in FIXED and k in JobSubmit.model_fields}
        try:
            JobSubmit.model_validate({"queue": "q", "command": ["true"], **usable})
        except ValidationError as e:
            problems.append(
                "defaults are not valid job fields: "
                + "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def covers(self, queue_path: Sequence[str]) -> bool:
        return self.scope is None or any(q in queue_path for q in self.scope.queues)


class AdmissionHook(Hook):
    """The policy's hook: validate-and-mutate for what rules cannot say. It runs while submissions wait, so
    its timeout is short; `fail_open` lets submissions through when the hook cannot answer (default: refuse)."""

    timeout_s: float = Field(default=2, gt=0, le=10)
    fail_open: bool = False


class AdmissionPolicy(Body):
    """The whole document, as `corral policy apply -f policy.yaml` sends it."""

    rules: list[Rule] = Field(default_factory=list)
    hook: AdmissionHook | None = None

    @model_validator(mode="after")
    def _unique_names(self) -> AdmissionPolicy:
        # One pass (counting), not names.count per rule: a policy of n rules costs n, not n * n, to validate.
        twice = sorted(n for n, k in Counter(r.name for r in self.rules).items() if k > 1)
        if twice:
            # Rejections name the rule: two rules of one name would make that ambiguous.
            raise ValueError(f"rule names must be unique; repeated: {', '.join(twice)}")
        return self


def parse(document: Mapping[str, Any], queues: Sequence[str] | set[str] | None = None) -> AdmissionPolicy:
    """Validate a document as a whole; AdmissionError lists every problem with where it is, all at once: the
    fields of every rule, repeated rule names even where a rule is invalid (pydantic skips the policy's own
    checks then), and with `queues` (the tree's) scoped queues that do not exist."""
    problems: list[tuple[str, str]] = []
    policy: AdmissionPolicy | None = None
    try:
        policy = AdmissionPolicy.model_validate(document)
    except ValidationError as e:
        problems = [(".".join(str(p) for p in err["loc"]) or "document", err["msg"]) for err in e.errors()]
    raw = document.get("rules") if isinstance(document, Mapping) else None
    raw_rules = [r for r in raw if isinstance(r, Mapping)] if isinstance(raw, list) else []
    if policy is None:
        names = Counter(r["name"] for r in raw_rules if isinstance(r.get("name"), str))
        twice = sorted(n for n, k in names.items() if k > 1)
        if twice:
            problems.append(("document", f"rule names must be unique; repeated: {', '.join(twice)}"))
    if queues is not None:
        known = set(queues)
        for i, r in enumerate(raw if isinstance(raw, list) else []):
            scope = r.get("scope") if isinstance(r, Mapping) else None
            listed = scope.get("queues") if isinstance(scope, Mapping) else None
            for q in listed if isinstance(listed, list) else []:
                if isinstance(q, str) and q not in known:
                    problems.append((f"rules.{i}.scope.queues", f"queue {q!r} does not exist"))
    if problems or policy is None:
        raise AdmissionError(problems or [("document", "not a valid admission policy")])
    return policy


def unknown_queues(policy: AdmissionPolicy, queues: Sequence[str] | set[str]) -> list[tuple[str, str]]:
    """Scoped queues that do not exist: a typo would make a rule silently apply nowhere."""
    known = set(queues)  # a list would make this rules x queues
    return [
        (f"rules.{i}.scope.queues", f"queue {q!r} does not exist")
        for i, r in enumerate(policy.rules)
        if r.scope is not None
        for q in r.scope.queues
        if q not in known
    ]


@dataclass(frozen=True)
class Rejection:
    rule: str
    field: str
    value: Any
    message: str


@dataclass(frozen=True)
class HookAnswer:
    """What a hook said: allow or not, why, and fields to change (validate-and-mutate)."""

    allowed: bool
    reason: str
    patch: dict[str, Any] = field(default_factory=dict)


HookRunner = Callable[[dict[str, Any]], HookAnswer]
HOOK = "hook"  # the rule name rejections and changes by the hook carry


@dataclass(frozen=True)
class Decision:
    allowed: bool
    job: JobSubmit  # the submission with every default filled in: what is stored when allowed
    applied: list[tuple[str, str]]  # (rule, what it changed)
    rejected: Rejection | None = None

    def json(self) -> dict[str, Any]:
        r = self.rejected
        return {
            "allowed": self.allowed,
            "job": self.job.model_dump(mode="json"),
            "applied": [{"rule": n, "change": w} for n, w in self.applied],
            "rejected": None
            if r is None
            else {"rule": r.rule, "field": r.field, "value": r.value, "message": r.message},
        }


def evaluate(
    policy: AdmissionPolicy, sub: JobSubmit, queue_path: Sequence[str], hook: HookRunner | None = None, user: str = ""
) -> Decision:
    """What `policy` does to `sub` in the queue whose path (itself, then up to the top) is `queue_path`.
    `hook` runs the policy's hook, if any (the service passes one; pure callers may leave it out)."""
    rules = [r for r in policy.rules if r.covers(queue_path)]
    job, applied = _fill(rules, sub)
    why = _violation(rules, job)
    if why is not None:
        return Decision(False, job, applied, why)
    if policy.hook is None or hook is None:
        return Decision(True, job, applied)
    answer = hook(
        {
            "job": job.model_dump(mode="json"),
            "queue": job.queue,
            "queue_path": list(queue_path),
            "kind": job.kind,
            "user": user,
        }
    )
    if not answer.allowed:
        return Decision(False, job, applied, Rejection(HOOK, "", None, answer.reason))
    fixed = sorted(f for f in answer.patch if f in FIXED or f not in JobSubmit.model_fields)
    if fixed:
        return Decision(
            False,
            job,
            applied,
            Rejection(HOOK, fixed[0], answer.patch[fixed[0]], f"the hook may not change {', '.join(fixed)}"),
        )
    try:
        patched = JobSubmit.model_validate({**job.model_dump(), **answer.patch})
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        return Decision(
            False,
            job,
            applied,
            Rejection(HOOK, where, err.get("input"), f"the hook's change is not valid: {where}: {err['msg']}"),
        )
    applied += [
        (HOOK, f"{f}: {_show(getattr(job, f))} -> {_show(getattr(patched, f))}")
        for f in answer.patch
        if getattr(job, f) != getattr(patched, f)
    ]
    why = _violation(rules, patched)
    return Decision(why is None, patched, applied, why)


def _fill(rules: Sequence[Rule], sub: JobSubmit) -> tuple[JobSubmit, list[tuple[str, str]]]:
    """Defaults and runtime caps into the fields the submission left unset (absent or None)."""
    values = sub.model_dump()
    given = {f for f in sub.model_fields_set if values[f] is not None}
    applied: list[tuple[str, str]] = []
    for r in rules:
        for f, v in r.defaults.items():
            if f in DICT_FIELDS:
                missing = {k: x for k, x in dict(v).items() if k not in values[f]}
                if missing:
                    values[f] = {**values[f], **missing}
                    applied.append((r.name, f"{f}: added {_show(missing)}"))
            elif f not in given:
                values[f] = v
                given.add(f)
                applied.append((r.name, f"{f}: set to {_show(v)}"))
        if r.max_runtime_cap_s is not None and "max_runtime" not in given:
            # Without a runtime a capped job would run for ever: give it the cap rather than refuse it.
            values["max_runtime"] = r.max_runtime_cap_s
            given.add("max_runtime")
            applied.append((r.name, f"max_runtime: set to the cap {r.max_runtime_cap_s:g}s"))
    if not applied:
        return sub, applied
    job = JobSubmit.model_validate(values)
    return job, applied


def _violation(rules: Sequence[Rule], job: JobSubmit) -> Rejection | None:
    """The first check of the first rule that `job` breaks, naming the rule, the field and the value."""
    total = job.workers * job.gpus
    for r in rules:
        if r.allowed_images is not None and not any(_image_allowed(job.image, p) for p in r.allowed_images):
            allowed = ", ".join(r.allowed_images)
            what = "no image" if job.image is None else f"image {job.image!r}"
            return Rejection(
                r.name, "image", job.image, f"rule {r.name!r}: {what} is not allowed; images must start with {allowed}"
            )
        if job.kind == "job" and r.max_gpus_per_job is not None and total > r.max_gpus_per_job:
            return Rejection(
                r.name,
                "gpus",
                total,
                f"rule {r.name!r}: the job asks for {total} GPUs "
                f"({job.workers} workers x {job.gpus}); at most {r.max_gpus_per_job} per job",
            )
        if job.kind == "sandbox" and r.max_gpus_per_sandbox is not None and total > r.max_gpus_per_sandbox:
            return Rejection(
                r.name,
                "gpus",
                total,
                f"rule {r.name!r}: the sandbox asks for {total} GPUs; at most {r.max_gpus_per_sandbox} per sandbox",
            )
        if r.max_runtime_cap_s is not None and job.max_runtime is not None and job.max_runtime > r.max_runtime_cap_s:
            return Rejection(
                r.name,
                "max_runtime",
                job.max_runtime,
                f"rule {r.name!r}: max_runtime {job.max_runtime:g}s is over the cap of {r.max_runtime_cap_s:g}s",
            )
        for label in r.required_labels:
            if not job.labels.get(label, "").strip():
                return Rejection(
                    r.name, f"labels.{label}", job.labels.get(label), f"rule {r.name!r}: label {label!r} is required"
                )
    return None


def _image_allowed(image: str | None, prefix: str) -> bool:
    """`prefix` matches whole path parts: registry.io/ml allows registry.io/ml/x and registry.io/ml:1, not
    registry.io/ml-evil/x (a plain string prefix would)."""
    if image is None or not image.startswith(prefix):
        return False
    rest = image[len(prefix) :]
    return rest == "" or prefix[-1] in "/:@" or rest[0] in "/:@"


def _show(v: Any) -> str:
    return repr(v) if isinstance(v, str) else str(v)
