"""Idle-GPU culling for notebook sandboxes: decide, from GPU samples, when to warn and when to stop.

Pure bookkeeping: no clock, no I/O, no threads. The scheduling loop reads samples (sandbox.nvml_samples), passes
them to `IdleTracker.observe` with its own monotonic time, and carries out the `Warn` and `Stop` actions it gets
back. A sandbox is idle while *every* one of its GPUs reads under the threshold and holds its memory steady; the
first sample that shows work (utilisation at or over the threshold, or memory allocated or freed) ends the idle
stretch. After `idle_timeout_s` of unbroken idleness the sandbox is stopped, `warn_before_s` after a warning.

Why no averaging: NVML's utilisation is already the share of its own sample period (1/6 s to 1 s) in which a
kernel ran, so a reading over the threshold is real work, never noise; averaging it away could stop a user in
the middle of a short cell. Low readings during real work (the first samples of a job, before its first kernel,
read 0-3 % in the H100/H200 traces) are harmless: they open an idle stretch that the next busy sample closes long
before any timeout, and those lead-in samples also allocate memory, which counts as work by itself.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass

_MIB = 1 << 20


@dataclass(frozen=True)
class IdlePolicy:
    """When a sandbox counts as idle and how long it may stay so; one per profile (see `for_profile`)."""

    threshold_pct: float = 5.0
    """GPU utilisation, in percent, under which a GPU is idle. A notebook that holds its tensors but runs nothing
    reads 0-4 % (the CUDA context, a stray tiny kernel); real work reads tens of percent, so 5 % separates them."""

    idle_timeout_s: float = 1800.0
    """Seconds of unbroken idleness, on all the sandbox's GPUs, before it is stopped. 30 minutes outlasts a
    coffee break or a long read of the docs, while bounding what a forgotten notebook wastes."""

    warn_before_s: float = 300.0
    """Seconds between the warning and the stop: long enough for a user who is still there to run something."""

    mem_change_bytes: int = _MIB
    """A change of used GPU memory of at least this many bytes between two samples counts as work, whatever the
    utilisation: loading or freeing tensors is a user at work, though it runs few kernels. Memory is exactly
    constant while idle in the real traces, so 1 MiB is far above noise. 0 turns the rule off."""

    max_gap_s: float = 600.0
    """Seconds between two samples beyond which idleness is not assumed for the gap: the stretch starts again at
    the later sample. A stalled scheduling loop saw nothing in between and must not stop a sandbox on that."""

    def __post_init__(self) -> None:
        if not 0 < self.threshold_pct <= 100:
            raise ValueError(f"threshold_pct must be in (0, 100], got {self.threshold_pct}")
        if self.idle_timeout_s <= 0:
            raise ValueError(f"idle_timeout_s must be > 0, got {self.idle_timeout_s}")
        if not 0 < self.warn_before_s <= self.idle_timeout_s:
            raise ValueError(f"warn_before_s must be in (0, idle_timeout_s], got {self.warn_before_s}")
        if self.mem_change_bytes < 0 or self.max_gap_s <= 0:
            raise ValueError("mem_change_bytes must be >= 0 and max_gap_s > 0")

    def for_profile(self, idle_timeout_s: float | None) -> IdlePolicy:
        """This policy with a profile's own timeout (None: keep it); the warning shrinks to fit a short timeout."""
        if idle_timeout_s is None:
            return self
        return dataclasses.replace(
            self, idle_timeout_s=idle_timeout_s, warn_before_s=min(self.warn_before_s, idle_timeout_s)
        )


@dataclass(frozen=True)
class ProcSample:
    """One process on a GPU: host pid, its GPU memory, and its SM utilisation (None: NVML gave none)."""

    pid: int
    used_memory_bytes: int
    sm_util_pct: float | None = None


@dataclass(frozen=True)
class GpuSample:
    """One GPU at one moment. `procs` None: the process list could not be read (whole-GPU readings decide)."""

    util_pct: float
    mem_used_bytes: int
    procs: tuple[ProcSample, ...] | None = None


@dataclass(frozen=True)
class Warn:
    """The sandbox has been idle since `idle_since` and will be stopped at `stop_at` unless it does some work."""

    sandbox_id: str
    idle_since: float
    stop_at: float
    idle_gpu_minutes: float


@dataclass(frozen=True)
class Stop:
    """Stop the sandbox and free its GPUs; `idle_gpu_minutes` (idle time x GPUs) is what the event records."""

    sandbox_id: str
    idle_since: float
    idle_gpu_minutes: float


Action = Warn | Stop


@dataclass
class _State:
    last_t: float | None = None
    last_mem: dict[int, int | None] = dataclasses.field(default_factory=dict)  # GPU index -> bytes (None: unread)
    idle_since: float | None = None
    warned_at: float | None = None


def _reading(sample: GpuSample, pids: Collection[int] | None) -> tuple[float, int]:
    """(utilisation %, memory bytes) that count for the sandbox on this GPU.

    With the sandbox's pids and a per-process utilisation for each of its processes there, only those processes
    count: another tenant's work on a shared GPU neither keeps the sandbox alive nor hides that it idles. Without
    per-process utilisation, the whole GPU decides, memory included, so the two readings describe the same thing;
    on a shared GPU that can only keep a sandbox longer, never stop a busy one.
    """
    if pids is None or sample.procs is None or any(p.sm_util_pct is None for p in sample.procs):
        return sample.util_pct, sample.mem_used_bytes
    mine = [p for p in sample.procs if p.pid in pids]
    return sum(p.sm_util_pct or 0.0 for p in mine), sum(p.used_memory_bytes for p in mine)


def _gpu_idle(reading: tuple[float, int] | None, mem_before: int | None, policy: IdlePolicy) -> bool:
    """Under the threshold, and memory neither allocated nor freed since the previous sample."""
    if reading is None or mem_before is None or reading[0] >= policy.threshold_pct:
        return False
    return policy.mem_change_bytes == 0 or abs(reading[1] - mem_before) < policy.mem_change_bytes


class IdleTracker:
    """Idle stretches of many sandboxes, fed by `observe`; one instance lives in the scheduling loop."""

    def __init__(self, policy: IdlePolicy | None = None) -> None:
        self.default = policy or IdlePolicy()
        self._policies: dict[str, IdlePolicy] = {}
        self._states: dict[str, _State] = {}

    def set_policy(self, sandbox_id: str, policy: IdlePolicy) -> None:
        """Use `policy` for this sandbox (its profile's) until `forget`; it applies from the next observation."""
        self._policies[sandbox_id] = policy

    def policy_for(self, sandbox_id: str) -> IdlePolicy:
        return self._policies.get(sandbox_id, self.default)

    def idle_since(self, sandbox_id: str) -> float | None:
        """When the current idle stretch began (the first idle sample's time), or None while the sandbox works."""
        state = self._states.get(sandbox_id)
        return state.idle_since if state else None

    def status(self, sandbox_id: str) -> tuple[float, float, bool] | None:
        """(idle_since, stop_at, warned) of the current idle stretch; None while the sandbox works (or is unseen).
        `stop_at` is when it will be stopped unless it works before: the warning's deadline once warned."""
        state = self._states.get(sandbox_id)
        if state is None or state.idle_since is None:
            return None
        policy = self.policy_for(sandbox_id)
        stop_at = state.idle_since + policy.idle_timeout_s
        if state.warned_at is not None:
            stop_at = max(stop_at, state.warned_at + policy.warn_before_s)
        return state.idle_since, stop_at, state.warned_at is not None

    def watched(self) -> list[str]:
        """Sandboxes observed (or given a policy) and not forgotten."""
        return sorted(self._states.keys() | self._policies.keys())

    def forget(self, sandbox_id: str) -> None:
        """Drop all that is known of a sandbox: call it once the sandbox is stopped or gone."""
        self._states.pop(sandbox_id, None)
        self._policies.pop(sandbox_id, None)

    def observe(
        self,
        sandbox_id: str,
        now: float,
        samples: Mapping[int, GpuSample | None],
        pids: Collection[int] | None = None,
    ) -> list[Action]:
        """Take one reading of the sandbox's GPUs (index -> sample; None: unreadable) at `now` (seconds, monotonic).

        `pids` are the sandbox's host pids, for per-process attribution (see `_reading`); None: whole GPUs.
        An unreadable GPU counts as working, as does a change in the set of GPUs: neither proves idleness.
        Returns at most one `Warn` per idle stretch, then `Stop` on every observation from the deadline on, until
        `forget` or new work: stopping is idempotent, and a stop that failed is retried on the next tick.
        """
        policy = self.policy_for(sandbox_id)
        state = self._states.setdefault(sandbox_id, _State())
        if state.last_t is not None and now < state.last_t:
            raise ValueError(f"{sandbox_id}: time went back from {state.last_t} to {now}; pass a monotonic clock")
        readings = {i: None if s is None else _reading(s, pids) for i, s in samples.items()}
        # The first sample only sets the memory baseline, and a new set of GPUs has none: neither proves idleness.
        idle = (
            bool(readings)
            and readings.keys() == state.last_mem.keys()
            and all(_gpu_idle(r, state.last_mem[i], policy) for i, r in readings.items())
        )
        gap = state.last_t is not None and now - state.last_t > policy.max_gap_s
        state.last_t = now
        state.last_mem = {i: None if r is None else r[1] for i, r in readings.items()}
        if not idle:
            state.idle_since = state.warned_at = None
            return []
        if state.idle_since is None or gap:
            state.idle_since, state.warned_at = now, None
        idle_since = state.idle_since
        gpu_minutes = (now - idle_since) * len(readings) / 60.0
        if state.warned_at is None:
            if now < idle_since + policy.idle_timeout_s - policy.warn_before_s:
                return []
            state.warned_at = now
            # A late first look (a slow loop, a shortened timeout) still gives the user the whole warning period.
            stop_at = max(idle_since + policy.idle_timeout_s, now + policy.warn_before_s)
            return [Warn(sandbox_id, idle_since, stop_at, gpu_minutes)]
        stop_at = max(idle_since + policy.idle_timeout_s, state.warned_at + policy.warn_before_s)
        return [Stop(sandbox_id, idle_since, gpu_minutes)] if now >= stop_at else []


# ----- times people read (the service's clock is wall time: seconds since the epoch) -----


def duration_text(seconds: float) -> str:
    """A duration rounded as people say it: "under a minute", "1 minute", "12 minutes", "1 hour 5 minutes"."""
    minutes = round(max(seconds, 0.0) / 60)
    if seconds < 30:
        return "under a minute"
    hours, minutes = divmod(minutes, 60)
    parts = [f"{hours} hour{'s' if hours != 1 else ''}"] if hours else []
    if minutes or not hours:
        parts.append(f"{minutes} minute{'s' if minutes != 1 else ''}")
    return " ".join(parts)


def clock_text(epoch: float) -> str:
    """A moment as a UTC time of day, "14:32 UTC" (with the date when it is not today's, in UTC)."""
    at, today = time.gmtime(epoch), time.gmtime()
    day = "" if at[:3] == today[:3] else time.strftime("%Y-%m-%d ", at)
    return f"{day}{time.strftime('%H:%M', at)} UTC"


def warning_text(idle_since: float, stop_at: float, now: float) -> str:
    """The idle warning a user reads: when the stop comes, how long the GPUs have idled, what to do."""
    # Short enough for a JupyterLab notification (it cuts at 140 characters): the stop first.
    return (
        f"This notebook will be stopped in {duration_text(stop_at - now)}, at {clock_text(stop_at)}: its GPUs "
        f"idle for {duration_text(now - idle_since)} (since {clock_text(idle_since)}). Use them or save work."
    )
