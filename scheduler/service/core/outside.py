"""Work Corral did not place on its nodes (SharesNodes; Kubernetes: DaemonSets, kube-scheduler's pods): counted in the
engine before anything is placed there, and the check another scheduler's bind onto one of Corral's nodes passes
(scheduler/service/api/webhook.py calls admit_binding).

Both run under the core's lock, as scheduling cycles do: a cycle's placements are in the engine before their pods are
bound, and a bind the webhook allows is in the engine before the next cycle places anything. So neither side can take
room the other was given, whichever binds first.
"""

from __future__ import annotations

from scheduler.backends.base import Held, SharesNodes
from scheduler.engine import Engine
from scheduler.service.core.interfaces import ChecksBindings


def sync_held(core: ChecksBindings, now: float) -> None:
    """What the executor says others hold now, into the engine (under the core's lock)."""
    if isinstance(core.executor, SharesNodes):
        for node, held in core.executor.held(now).items():
            core.cluster.held[node] = held
            apply(core.engine, node, held)


def apply(engine: Engine, node: str, held: Held) -> None:
    if node in engine.node_pool:
        engine.node_held(node, held.gpus, held.cpus, held.memory_gb)


def admit_binding(core: ChecksBindings, namespace: str, pod: str, node: str) -> str | None:
    """Why another scheduler may not bind this pod to `node` now (None: it may). Only Corral's nodes are checked;
    there the pod must fit in what neither Corral's jobs nor others' pods hold, as the kubelet would check it."""
    ex = core.executor
    if not isinstance(ex, SharesNodes) or node not in core.cluster.nodes:
        return None
    found = ex.binding(namespace, pod)  # an API call: outside the lock
    if found is None:
        return None
    uid, held = found
    with core.lock:
        if core.leadership is not None and not (core.leadership.acting() and core.started):
            # Only the leader knows the nodes' room (a follower has no engine): refused, the scheduler tries again
            # and reaches the leader (the webhook's Service spreads calls over the replicas).
            return f"this Corral replica does not lead: bind of {namespace}/{pod} not checked, try again"
        now = core.clock()
        sync_held(core, now)
        if node in core.cluster.down:  # Corral places nothing there
            return None
        gpus, cpus, memory_gb = core.engine.node_room(node)
        short = [
            f"{asked:g} {what} asked, {free:g} free"
            for what, asked, free in (
                ("GPUs", held.gpus, gpus),
                ("CPUs", held.cpus, cpus),
                ("GiB of memory", held.memory_gb, memory_gb),
            )
            if asked > free
        ]
        if short:
            return f"node {node} is scheduled by Corral and has no room for pod {namespace}/{pod}: {'; '.join(short)}"
        ex.admit(uid, node, held)
        sync_held(core, now)
    return None
