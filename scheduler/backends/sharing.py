"""Shares of one GPU on this machine: the environment that caps each share, and the check that shares fit.

Processes that share a GPU see the same CUDA_VISIBLE_DEVICES. What keeps each within its share:

- CUDA MPS, where its control daemon runs (its pipe directory holds `control`): CUDA_MPS_PINNED_DEVICE_MEM_LIMIT
  caps the share's device memory (enforced by the driver: an allocation past it fails) and
  CUDA_MPS_ACTIVE_THREAD_PERCENTAGE its SMs. Hard limits, whatever framework the job uses.
- Otherwise the frameworks' own allocator limits, which are soft: they bind only code that goes through that
  allocator and honours the setting. XLA_PYTHON_CLIENT_MEM_FRACTION (JAX preallocates exactly that share),
  TF_FORCE_GPU_ALLOW_GROWTH (TensorFlow takes memory as it needs it instead of all of it), and
  CORRAL_GPU_MEMORY_FRACTION, which the SDK applies to PyTorch (notebooks.gpu_share.apply:
  torch.cuda.set_per_process_memory_fraction) and TensorFlow (a logical device of CORRAL_GPU_MEMORY_MB).

The memory cap is the fraction times the GPU's memory as NVML reports it (MiB, rounded down). A MIG instance needs
none of this: the hardware isolates it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Hashable, Iterable, Mapping
from pathlib import Path
from typing import TypeVar

FRACTION_ENV = "CORRAL_GPU_FRACTION"  # the share of the GPU the job holds, as the scheduler counts it
MEMORY_FRACTION_ENV = "CORRAL_GPU_MEMORY_FRACTION"  # the share of its memory (the SDK applies it)
MEMORY_MB_ENV = "CORRAL_GPU_MEMORY_MB"  # the same in MiB, where the GPU's memory is known
CAP_ENV = "CORRAL_GPU_MEMORY_CAP"  # how the cap is enforced: "mps" (the driver) or "soft" (the frameworks)
MPS_PIPE_ENV = "CUDA_MPS_PIPE_DIRECTORY"
DEFAULT_MPS_PIPE = Path("/tmp/nvidia-mps")  # nvidia-cuda-mps-control's default pipe directory
EPSILON = 1e-9  # shares are decimals: 0.1 + 0.2 + 0.7 must fit in 1
K = TypeVar("K", bound=Hashable)


def mps_pipe() -> Path:
    """Where this machine's MPS control daemon listens ($CUDA_MPS_PIPE_DIRECTORY, else its default)."""
    return Path(os.environ.get(MPS_PIPE_ENV) or DEFAULT_MPS_PIPE)


def mps_running(pipe: Path) -> bool:
    """Whether an MPS control daemon runs there: it makes the `control` pipe when it starts, removes it on quit."""
    return (pipe / "control").exists()


def check_fraction(fraction: float) -> float:
    """`fraction` if it is a share of one GPU, in (0, 1); else ValueError."""
    if not isinstance(fraction, int | float) or isinstance(fraction, bool) or not 0 < fraction < 1:
        raise ValueError(f"a GPU share must be a number in (0, 1), got {fraction!r}")
    return float(fraction)


def share_env(fraction: float, memory_mb: int, mps: Path | None) -> dict[str, str]:
    """The environment of a job holding `fraction` of a GPU of `memory_mb` MiB (0: unknown), under MPS when `mps`
    (its pipe directory) is given, else with the frameworks' soft limits. The GPU is device 0 to the job (its
    CUDA_VISIBLE_DEVICES names that GPU alone)."""
    fraction = check_fraction(fraction)
    cap_mb = math.floor(fraction * memory_mb)
    env = {
        FRACTION_ENV: f"{fraction:g}",
        MEMORY_FRACTION_ENV: f"{fraction:g}",
        CAP_ENV: "mps" if mps is not None else "soft",
        # Also under MPS: they keep a framework from reserving more than the share up front, which MPS would refuse.
        "XLA_PYTHON_CLIENT_MEM_FRACTION": f"{fraction:.4g}",
        "TF_FORCE_GPU_ALLOW_GROWTH": "true",
    }
    if cap_mb > 0:
        env[MEMORY_MB_ENV] = str(cap_mb)
    if mps is not None:
        env[MPS_PIPE_ENV] = str(mps)
        env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(max(1, math.ceil(fraction * 100)))
        if cap_mb > 0:
            env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] = f"0={cap_mb}M"
    return env


def per_gpu(held: Iterable[tuple[K, float]]) -> dict[K, float]:
    """The shares held of each GPU, summed: (GPU, share) pairs in (a whole GPU is a share of 1.0)."""
    out: dict[K, float] = {}
    for gpu, share in held:
        out[gpu] = out.get(gpu, 0.0) + share
    return out


def overfull(held: Iterable[tuple[K, float]]) -> Mapping[K, float]:
    """GPUs whose shares sum to more than 1, with their sums ({} when every GPU fits)."""
    return {gpu: total for gpu, total in per_gpu(held).items() if total > 1 + EPSILON}
