"""`python -m tests.idle_gpu_service`: the service as `python -m scheduler.service` runs it, but its declared
(virtual) GPUs are read like NVML GPUs that sit idle (0 %, memory steady), so the idle culler warns and stops
sandboxes as it would on a real machine whose notebooks went quiet (tests/test_sandbox_lab.py)."""

from __future__ import annotations

import dataclasses
from typing import Any

from sandbox.culling import GpuSample
from scheduler.service.core import assemble
from scheduler.service.core.settings import ServiceSettings

_detect = assemble.detect


def _idle() -> dict[int, GpuSample]:
    return {i: GpuSample(0.0, 512 << 20) for i in range(64)}


def _as_measured(*args: Any) -> Any:
    return dataclasses.replace(_detect(*args), kind="nvml")


if __name__ == "__main__":
    assemble.detect = _as_measured  # type: ignore[assignment]
    assemble.read_samples = _idle  # type: ignore[assignment]
    assemble.serve(ServiceSettings())
