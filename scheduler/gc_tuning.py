"""Garbage-collector settings for the long-running commands: the service and the simulator's replays."""

from __future__ import annotations

import gc


def tune_gc() -> None:
    """Freeze what is alive now out of collection, and run full collections less often.

    The engine keeps every live job in memory and a replay every job of its trace: the collector's full passes
    over them were the service's tail latency, and single pauses of 0.3 s in a 50,000-job replay. Call it once
    the long-lived state is loaded; garbage left from before is collected first, not frozen with it (a report
    replays one policy after another).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
