"""Synthetic traces (`corral sim generate`): teams running long non-preemptible services beside preemptible batch.

The `services` model is the production case of issue 20: a mostly idle cluster where each team's
inference services (non-preemptible, running for weeks) sit next to its stream of preemptible batch jobs.

- `teams` teams (default 6) under departments of three, over `pools` pools (default 3) of 8-GPU nodes. Team i's
  home pool is pool i mod `pools`.
- Services: 2 to 4 per team on its home pool, 1, 2, 4 or 8 GPUs each, one worker, non-preemptible, priority
  `service_priority` (they outrank the team's batch jobs), submitted within the first `service_window` seconds,
  running 14 to 90 days (uniform).
- Tight teams (every other team, starting with team 0): the quota on the home pool is exactly the GPUs of
  their first services, and one more service, as large as one of those, arrives `late_service` seconds in,
  after the batch stream has begun. It cannot run within the guarantee until a service ends (weeks later),
  so it waits with GPUs free (which the spec wants) and, once past the starvation timeout, starves: what the
  guard then holds back of the team's batch jobs is what issue 20 measured.
- Batch jobs: Poisson arrivals at `batch_per_day` per team over `days` days; durations lognormal with a median
  of one hour (sigma 1.5) cut to [5 minutes, 3 days]; 1, 2, 4 or 8 GPUs (weights 40/25/20/15 %), and one in ten
  a gang of 2 to 4 workers of 8 GPUs; 75 % on the home pool, the rest on another pool; preemptible, priority 0.
- Capacity: per pool, whole nodes such that the mean GPU demand (services' GPUs plus batch GPU-time over the
  batch span) is about `busy` (default 35 %) of it, so most GPUs are idle on average; at least the largest
  gang and the sum of the quotas.
- Quotas: per pool, each team's share of the pool's demand, of `quota_share` (default 80 %) of its capacity,
  never below its services' GPUs; tight teams get their first services' GPUs exactly (see above). A
  department's quota is the sum of its teams'. No limits.

Deterministic: the same arguments give the same files, byte for byte.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from scheduler.engine import Settings
from scheduler.sim.importers import TraceJob, write_trace

DAY = 86400.0
POOL_NAMES = ("h100", "a100", "l40s")
GPUS_PER_NODE = 8
SERVICE_GPUS = (1, 2, 4, 8)
BATCH_GPUS, BATCH_WEIGHTS = (1, 2, 4, 8), (40, 25, 20, 15)


@dataclass(frozen=True)
class ServicesConfig:
    """Knobs of the `services` model (see the module docstring)."""

    seed: int = 1
    teams: int = 6
    pools: int = 3
    days: float = 30.0  # batch arrivals span this many days
    batch_per_day: float = 24.0  # per team
    service_window: float = 6 * 3600.0  # services are submitted within this many seconds of the start
    late_service: float = 2 * DAY  # when a tight team's extra service arrives
    service_priority: int = 1
    busy: float = 0.35  # mean GPU demand / capacity the pools are sized for
    quota_share: float = 0.8  # part of each pool's capacity given out as quotas (demand-proportional)
    starvation_timeout: float = Settings.starvation_timeout


@dataclass
class Generated:
    """A generated trace and the cluster it is meant for."""

    jobs: list[TraceJob]
    nodes: dict[str, int]  # pool -> nodes of GPUS_PER_NODE GPUs
    departments: dict[str, list[str]]  # department -> its teams
    quotas: dict[str, dict[str, int]]  # team -> pool -> GPUs
    settings: Settings
    config: object  # the model's knobs (ServicesConfig, sharing.SharingConfig)
    comment: list[str]  # the cluster file's first lines: how it was made

    def cluster_yaml(self) -> str:
        """The cluster file of SIMULATOR.md for this trace (commented, flow-style like the examples)."""
        cap = {p: n * GPUS_PER_NODE for p, n in self.nodes.items()}
        lines = [*(f"# {c}" for c in self.comment), "cluster:", "  pools:"]
        lines += [f"    - {{name: {p}, nodes: {n}, gpus_per_node: {GPUS_PER_NODE}}}" for p, n in self.nodes.items()]
        lines.append("queues:")
        for dept, teams in self.departments.items():
            total = {p: sum(self.quotas[t].get(p, 0) for t in teams) for p in cap}
            lines.append(f"  - {{name: {dept}, quota: {_flow(total)}}}")
            lines += [f"  - {{name: {t}, parent: {dept}, quota: {_flow(self.quotas[t])}}}" for t in teams]
        s = self.settings
        lines.append(f"settings: {{min_runtime: {s.min_runtime:g}, starvation_timeout: {s.starvation_timeout:g}}}")
        return "\n".join(lines) + "\n"

    def write(self, trace: str | Path, cluster: str | Path) -> None:
        write_trace(self.jobs, trace)
        Path(cluster).write_text(self.cluster_yaml())


def _flow(m: dict[str, int]) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in m.items() if v) + "}"


def _batch_duration(rng: random.Random) -> float:
    return float(round(min(3 * DAY, max(300.0, rng.lognormvariate(math.log(3600.0), 1.5)))))


def services(config: ServicesConfig | None = None) -> Generated:
    """Generate the `services` trace and its cluster (see the module docstring)."""
    c = config or ServicesConfig()
    if c.teams < 1 or not 1 <= c.pools <= len(POOL_NAMES) or c.days <= 0 or c.batch_per_day < 0:
        raise ValueError(f"need teams >= 1, 1 <= pools <= {len(POOL_NAMES)}, days > 0, batch_per_day >= 0")
    rng = random.Random(c.seed)
    pools = list(POOL_NAMES[: c.pools])
    teams = [f"team-{i}" for i in range(c.teams)]
    home = {t: pools[i % len(pools)] for i, t in enumerate(teams)}
    rows: list[tuple[float, str, float, str, str, int, int, int, bool]] = []
    service_gpus: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))  # team -> pool -> all services
    tight: dict[str, int] = {}  # tight team -> GPUs of its first services: its home quota
    for i, t in enumerate(teams):
        n = rng.randint(2, 4)
        sizes = [rng.choice(SERVICE_GPUS) for _ in range(n)]
        for k, gpus in enumerate(sizes):
            submit = float(round(rng.uniform(0, c.service_window)))
            rows.append(
                (
                    submit,
                    f"svc-{t}-{k}",
                    float(round(rng.uniform(14, 90) * DAY)),
                    t,
                    home[t],
                    1,
                    gpus,
                    c.service_priority,
                    False,
                )
            )
            service_gpus[t][home[t]] += gpus
        if i % 2 == 0:
            tight[t] = service_gpus[t][home[t]]
            gpus = rng.choice(sizes)  # the size of one that runs: it fits the guarantee once that one ends
            rows.append(
                (
                    c.late_service,
                    f"svc-{t}-{n}",
                    float(round(rng.uniform(14, 90) * DAY)),
                    t,
                    home[t],
                    1,
                    gpus,
                    c.service_priority,
                    False,
                )
            )
            service_gpus[t][home[t]] += gpus
    batch_work: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))  # team -> pool -> GPU-s
    for t in teams:
        clock = 0.0
        while c.batch_per_day > 0:
            clock += rng.expovariate(c.batch_per_day / DAY)
            if clock >= c.days * DAY:
                break
            if rng.random() < 0.1:
                workers, gpus = rng.randint(2, 4), GPUS_PER_NODE
            else:
                workers, gpus = 1, rng.choices(BATCH_GPUS, BATCH_WEIGHTS)[0]
            others = [p for p in pools if p != home[t]]
            pool = home[t] if not others or rng.random() < 0.75 else rng.choice(others)
            duration = _batch_duration(rng)
            rows.append((float(round(clock)), "", duration, t, pool, workers, gpus, 0, True))
            batch_work[t][pool] += workers * gpus * duration
    # Demand per team and pool: its services' GPUs, plus its batch GPU-time spread over the batch span.
    demand = {t: {p: service_gpus[t][p] + batch_work[t][p] / (c.days * DAY) for p in pools} for t in teams}
    largest = max((r[5] * r[6] for r in rows), default=1)
    nodes: dict[str, int] = {}
    quotas: dict[str, dict[str, int]] = {t: {} for t in teams}
    for p in pools:
        total = sum(d[p] for d in demand.values())
        count = max(1, math.ceil(total / c.busy / GPUS_PER_NODE), math.ceil(largest / GPUS_PER_NODE))
        for t in teams:
            if t in tight and home[t] == p:
                quotas[t][p] = tight[t]
            else:
                share = int(c.quota_share * count * GPUS_PER_NODE * demand[t][p] / total) if total else 0
                quotas[t][p] = max(service_gpus[t][p], share)
        # Quotas may not add up to more than the pool: grow it (it stays mostly idle all the same).
        count = max(count, math.ceil(sum(q[p] for q in quotas.values()) / GPUS_PER_NODE))
        nodes[p] = count
    rows.sort(key=lambda r: (r[0], r[1] == "", r[1]))  # by submit; services first at one instant
    jobs: list[TraceJob] = []
    batch = 0
    for submit, jid, duration, queue, pool, workers, gpus, priority, preemptible in rows:
        if not jid:
            batch += 1
            jid = f"b{batch:05d}"
        jobs.append(TraceJob(jid, submit, duration, queue, pool, workers, gpus, priority, preemptible))
    departments = {f"dept-{d}": teams[3 * d : 3 * d + 3] for d in range(math.ceil(len(teams) / 3))}
    comment = [
        f"Generated by `corral sim generate services --seed {c.seed} --teams {c.teams} --pools {c.pools} "
        f"--days {c.days:g} --batch-per-day {c.batch_per_day:g}`.",
        f"{len(jobs)} jobs; pools sized so that mean demand is about {c.busy:.0%} of capacity.",
    ]
    return Generated(jobs, nodes, departments, quotas, Settings(0.0, c.starvation_timeout), c, comment)
