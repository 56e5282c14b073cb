"""Promotion policy: what a model version must show before it moves to staging or production.

A policy is a YAML document per model, validated as a whole like the queue tree (every problem is reported
with where it is). `evaluate` turns a stage's policy and the facts about a candidate into one result per
gate, each with the evidence behind it; it reads no database, no clock and no network, so the service
gathers the facts (approvals, the digest recomputed now, the hook's answer) and passes them in.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

STAGES = ("candidate", "staging", "production")

# "package.module:function" (the function may be an attribute path such as "Class.method").
_PYTHON_TARGET = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


class PolicyError(ValueError):
    """A policy document that cannot be applied; `problems` lists (where, what is wrong)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("the promotion policy is not valid: " + "; ".join(f"{w}: {p}" for w, p in problems))


class MetricGate(BaseModel):
    """A metric the candidate must reach: a fixed floor (`min`), a ceiling (`max`), and/or production's value."""

    model_config = ConfigDict(extra="forbid")

    metric: str = Field(min_length=1)
    min: float | None = None
    max: float | None = None
    # The candidate must be at least as good as the current production version on the same eval_set.
    vs_production: bool = False
    higher_is_better: bool = True

    @model_validator(mode="after")
    def _some_condition(self) -> MetricGate:
        if self.min is None and self.max is None and not self.vs_production:
            raise ValueError(f"metric gate {self.metric!r} needs at least one of min, max or vs_production")
        for name, bound in (("min", self.min), ("max", self.max)):
            if bound is not None and not math.isfinite(bound):
                raise ValueError(f"{name} must be a finite number, got {bound}")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is above max ({self.max}): no value could pass")
        return self

    @property
    def label(self) -> str:
        parts = []
        if self.min is not None:
            parts.append(f">= {self.min:g}")
        if self.max is not None:
            parts.append(f"<= {self.max:g}")
        if self.vs_production:
            parts.append("no worse than production")
        return f"metric {self.metric} " + ", ".join(parts)


class Hook(BaseModel):
    """An outside check that may reject a promotion with a reason: a Python callable or an HTTP endpoint."""

    model_config = ConfigDict(extra="forbid")

    python: str | None = None
    http: str | None = None
    timeout_s: float = Field(default=10, gt=0)

    @model_validator(mode="after")
    def _exactly_one(self) -> Hook:
        if (self.python is None) == (self.http is None):
            raise ValueError("a hook needs exactly one of python ('package.module:function') or http (a URL)")
        if self.python is not None and not _PYTHON_TARGET.match(self.python):
            raise ValueError(f"python hook must look like 'package.module:function', got {self.python!r}")
        if self.http is not None and not self.http.startswith(("http://", "https://")):
            raise ValueError(f"http hook must be an http:// or https:// URL, got {self.http!r}")
        return self

    @property
    def target(self) -> str:
        return f"python {self.python}" if self.python is not None else f"http {self.http}"


class StagePolicy(BaseModel):
    """Every gate a version must pass to enter one stage."""

    model_config = ConfigDict(extra="forbid")

    metrics: list[MetricGate] = []
    approvals: int = Field(default=0, ge=0)
    verify_digest: bool = True
    hook: Hook | None = None


class PromotionPolicy(BaseModel):
    """One model's policy: the gates into staging and into production."""

    model_config = ConfigDict(extra="forbid")

    stages: dict[Literal["staging", "production"], StagePolicy] = {}

    def for_stage(self, stage: str) -> StagePolicy:
        """The policy for `stage`, or the default when the document does not name it.

        Production defaults to one approval: a model that serves users should never reach production on
        one person's say alone, even when nobody wrote a policy. Staging defaults to no gates beyond the
        digest, because it exists to try versions out quickly and serves nobody.
        """
        if stage not in ("staging", "production"):
            raise ValueError(f"no promotion into {stage!r}: versions are promoted to staging or production")
        if stage in self.stages:
            return self.stages[stage]
        return StagePolicy(approvals=1) if stage == "production" else StagePolicy()


def _where(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part != "[key]":
            out += ("." if out else "") + part
    return out or "top level"


def load_policy(document: Mapping[str, object]) -> PromotionPolicy:
    """Validate a parsed YAML document; PolicyError (a ValueError) lists every problem with where it is."""
    if not isinstance(document, Mapping):
        raise PolicyError([("top level", f"expected a mapping, got {type(document).__name__}")])
    try:
        return PromotionPolicy.model_validate(dict(document))
    except ValidationError as err:
        problems = []
        for e in err.errors():
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] == "extra_forbidden":
                msg = "unknown field"
            elif e["loc"][-1:] == ("[key]",):
                msg = f"unknown stage {e['input']!r}: policies name staging and/or production"
            problems.append((_where(e["loc"]), msg))
        raise PolicyError(problems) from err


@dataclass(frozen=True)
class VersionFacts:
    """What the registry knows about one version, as `evaluate` needs it."""

    model: str
    version: int
    metrics: Mapping[str, float]
    eval_set: str | None
    digest: str
    artifact_uri: str
    # The metrics are what the job wrote in its output directory (metrics.json). False for versions registered
    # before Corral read them from there, whose metrics were typed in: no metric gate trusts those.
    measured_by_job: bool = True


TYPED_IN_BEFORE = (
    "metrics typed in before Corral 0.1.0 read them from the job's metrics.json; register again from the job's output"
)


@dataclass(frozen=True)
class GateResult:
    """One gate's outcome; `evidence` holds the numbers and names that decided it."""

    gate: str
    status: Literal["pass", "fail", "pending"]
    evidence: str


def _metric(gate: MetricGate, candidate: VersionFacts, production: VersionFacts | None) -> GateResult:
    if not candidate.measured_by_job:
        return GateResult(gate.label, "fail", f"unverified: v{candidate.version}'s {TYPED_IN_BEFORE}")
    value = candidate.metrics.get(gate.metric)
    if value is None or math.isnan(value):
        return GateResult(gate.label, "fail", f"not measured: v{candidate.version} has no {gate.metric}")
    failed: list[str] = []
    evidence = [f"v{candidate.version} {gate.metric} = {value:g}"]
    if gate.min is not None:
        evidence.append(f"floor {gate.min:g}")
        if value < gate.min:
            failed.append(f"{value:g} is below the floor {gate.min:g}")
    if gate.max is not None:
        evidence.append(f"ceiling {gate.max:g}")
        if value > gate.max:
            failed.append(f"{value:g} is above the ceiling {gate.max:g}")
    if gate.vs_production:
        failed += _vs_production(gate, value, candidate, production, evidence)
    text = "; ".join(evidence)
    return (
        GateResult(gate.label, "fail", "; ".join(failed) + f" ({text})")
        if failed
        else GateResult(gate.label, "pass", text)
    )


def _vs_production(
    gate: MetricGate, value: float, candidate: VersionFacts, production: VersionFacts | None, evidence: list[str]
) -> list[str]:
    """Compare with production; appends to `evidence`, returns the reasons it fails (none when it passes)."""
    if production is None:
        evidence.append("no production version yet")
        return []
    prod = production.metrics.get(gate.metric)
    if prod is None or math.isnan(prod):
        # Failing is the safe side: the policy asked for a comparison that cannot be made.
        return [f"production v{production.version} has no {gate.metric} to compare with"]
    evidence.append(f"production v{production.version} = {prod:g}")
    # A score on another evaluation set is not comparable, and an unrecorded set cannot be shown the same.
    if candidate.eval_set is None or production.eval_set is None or candidate.eval_set != production.eval_set:
        return [
            f"different eval sets: candidate on {candidate.eval_set or 'an unrecorded set'}, "
            f"production on {production.eval_set or 'an unrecorded set'}"
        ]
    evidence.append(f"both on eval set {candidate.eval_set}")
    worse = value < prod if gate.higher_is_better else value > prod
    if worse:
        direction = "lower" if gate.higher_is_better else "higher"
        return [f"{value:g} is {direction} (worse) than production's {prod:g}"]
    return []


def _approvals(needed: int, approvers: Sequence[str], requester: str) -> GateResult:
    # The service only passes approvals by users holding the model-owner role; here the four-eyes rule:
    # the requester's own approval never counts, and one person approving twice counts once.
    counted = list(dict.fromkeys(a for a in approvers if a != requester))
    label = f"approvals {min(len(counted), needed)}/{needed}"
    evidence = [f"approved by {', '.join(counted)}" if counted else "no approvals yet"]
    if requester in approvers:
        evidence.append(f"{requester} requested the promotion, so their approval does not count")
    if len(counted) >= needed:
        return GateResult(label, "pass", "; ".join(evidence))
    evidence.append(f"needs {needed - len(counted)} more from model owners other than {requester}")
    return GateResult(label, "pending", "; ".join(evidence))


def _digest(candidate: VersionFacts, digest_now: str | None) -> GateResult:
    if digest_now is None:
        return GateResult("digest", "fail", f"artifact missing: {candidate.artifact_uri} could not be read")
    if digest_now != candidate.digest:
        return GateResult(
            "digest",
            "fail",
            f"artifact changed since registration: registered sha256 "
            f"{candidate.digest}, now {digest_now} ({candidate.artifact_uri})",
        )
    return GateResult("digest", "pass", f"sha256 {digest_now} matches the registered digest")


def _hook(hook: Hook, outcome: tuple[bool, str] | None) -> GateResult:
    if outcome is None:
        return GateResult("hook", "pending", f"{hook.target} has not run yet")
    allowed, reason = outcome
    return GateResult("hook", "pass" if allowed else "fail", f"{hook.target}: {reason}")


def evaluate(
    stage: StagePolicy,
    candidate: VersionFacts,
    production: VersionFacts | None,
    approvers: Sequence[str],
    requester: str,
    digest_now: str | None,
    hook: tuple[bool, str] | None,
) -> list[GateResult]:
    """Every configured gate, in policy order: metrics, approvals, digest, hook.

    Gates the policy does not ask for (no approvals, verify_digest false, no hook) are not listed: a
    "pass" for a check that never ran would read as evidence it did.
    """
    results = [_metric(g, candidate, production) for g in stage.metrics]
    if stage.approvals:
        results.append(_approvals(stage.approvals, approvers, requester))
    if stage.verify_digest:
        results.append(_digest(candidate, digest_now))
    if stage.hook is not None:
        results.append(_hook(stage.hook, hook))
    return results


def promotable(results: Sequence[GateResult]) -> bool:
    """True when every gate passed (an empty list passes: the policy asked for nothing)."""
    return all(r.status == "pass" for r in results)
