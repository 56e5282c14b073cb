"""What the service knows of the cluster: its nodes (down, held by others) and the work it brought (Core owns it)."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

from scheduler.backends.base import Arrival, Held, NodeChange, NodeInfo
from scheduler.engine.model import mig_fraction


@dataclass(eq=False)
class ClusterState:
    """Nodes and arrivals as the executor reported them. Changed under the Core's lock (cluster_sync, outside), except
    the arrivals, which have their own lock: sandboxes run a cycle from request threads, and the executor hands each
    arrival over once."""

    nodes: dict[str, NodeInfo]
    down: set[str] = field(default_factory=set)  # known nodes that are down now (see cluster_sync)
    held: dict[str, Held] = field(default_factory=dict)  # node -> what work Corral did not place holds there (outside)
    node_backlog: list[NodeChange] = field(default_factory=list)  # reported by the executor, not yet committed
    arrivals: list[Arrival] = field(default_factory=list)  # work the cluster brought, not yet written
    # Keys of the arrivals since the start (every waiting one), until all are known; then None.
    offered_at_start: set[str] | None = field(default_factory=set)
    arrivals_lock: threading.Lock = field(default_factory=threading.Lock)  # one taker of arrivals at a time

    @property
    def capacity(self) -> dict[str, int]:
        """GPUs per pool, counting every known node (down ones too: quotas are checked against the configured size):
        whole GPUs, and MIG slices by their fractions (compute slices / 7), rounded down to whole GPUs, as quotas
        are whole GPUs."""
        out: dict[str, float] = {}
        for n in self.nodes.values():
            slices = sum(k * mig_fraction(p) for p, k in n.mig_counts().items())
            out[n.pool] = out.get(n.pool, 0) + len(n.whole()) + slices
        # Fractions are to a millionth (7 x 0.142857 is 0.999999): a slice layout of whole GPUs counts them whole.
        return {pool: math.floor(round(total, 4)) for pool, total in out.items()}
