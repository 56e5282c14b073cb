"""A job's share of a GPU applied to the frameworks in this process: PyTorch's and TensorFlow's allocator limits.

The local executor gives a job holding a share of a GPU CORRAL_GPU_MEMORY_FRACTION (and CORRAL_GPU_MEMORY_MB). Under
CUDA MPS the driver enforces the cap; otherwise it binds only what calls this (or sets its framework's limit itself):

    import notebooks.gpu_share
    notebooks.gpu_share.apply()   # first thing in the job or the notebook, before any tensor is on the GPU

A soft limit: code that allocates past the framework's allocator (another library, a second process) is not held
by it. JAX needs nothing here: the executor sets XLA_PYTHON_CLIENT_MEM_FRACTION, which it reads at start.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

FRACTION_ENV = "CORRAL_GPU_MEMORY_FRACTION"  # scheduler.backends.sharing's names, kept apart: the SDK imports no
MEMORY_MB_ENV = "CORRAL_GPU_MEMORY_MB"  # part of the service


def share(env: Mapping[str, str] | None = None) -> tuple[float, int | None] | None:
    """(fraction of the GPU's memory, MiB where known) this job may use; None when it holds a whole GPU."""
    env = os.environ if env is None else env
    text = env.get(FRACTION_ENV)
    if not text:
        return None
    try:
        fraction = float(text)
    except ValueError:
        raise ValueError(f"{FRACTION_ENV}={text!r} is not a number") from None
    if not 0 < fraction < 1:
        raise ValueError(f"{FRACTION_ENV}={text!r}: a share of a GPU is in (0, 1)")
    mb = env.get(MEMORY_MB_ENV)
    return fraction, int(mb) if mb and mb.isdigit() else None


def apply(env: Mapping[str, str] | None = None, modules: Mapping[str, Any] | None = None) -> list[str]:
    """Cap PyTorch and TensorFlow, where this process has imported them (or can import them), at the job's share
    of the GPU; the frameworks capped. Nothing to do (and []) for a job holding whole GPUs."""
    got = share(env)
    if got is None:
        return []
    fraction, mb = got
    mods = sys.modules if modules is None else modules
    done = []
    torch = mods.get("torch") or _try_import("torch", modules)
    if torch is not None and torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(fraction, 0)  # device 0: the job's only visible GPU
        done.append("torch")
    tf = mods.get("tensorflow") or _try_import("tensorflow", modules)
    if tf is not None and mb:
        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            tf.config.set_logical_device_configuration(gpus[0], [tf.config.LogicalDeviceConfiguration(memory_limit=mb)])
            done.append("tensorflow")
    log.info("GPU share %.3g applied to %s", fraction, ", ".join(done) or "no framework")
    return done


def _try_import(name: str, modules: Mapping[str, Any] | None) -> Any:
    if modules is not None:  # a test's stand-in modules: import nothing for real
        return None
    try:
        return __import__(name)
    except ImportError:
        return None
