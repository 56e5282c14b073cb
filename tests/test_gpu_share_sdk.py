"""notebooks.gpu_share: a job's share of a GPU applied to PyTorch and TensorFlow (stand-ins: no GPU here)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from notebooks import gpu_share


class FakeTorch:
    def __init__(self) -> None:
        self.calls: list[tuple[float, int]] = []
        self.cuda = SimpleNamespace(is_available=lambda: True, set_per_process_memory_fraction=self._set)

    def _set(self, fraction: float, device: int) -> None:
        self.calls.append((fraction, device))


class FakeTF:
    def __init__(self) -> None:
        self.limits: list[Any] = []
        self.config = SimpleNamespace(
            list_physical_devices=lambda kind: ["GPU:0"] if kind == "GPU" else [],
            set_logical_device_configuration=lambda dev, cfg: self.limits.append((dev, cfg)),
            LogicalDeviceConfiguration=lambda memory_limit: {"memory_limit": memory_limit},
        )


def test_a_share_caps_the_frameworks() -> None:
    torch, tf = FakeTorch(), FakeTF()
    env = {"CORRAL_GPU_MEMORY_FRACTION": "0.25", "CORRAL_GPU_MEMORY_MB": "20389"}
    assert gpu_share.apply(env, {"torch": torch, "tensorflow": tf}) == ["torch", "tensorflow"]
    assert torch.calls == [(0.25, 0)] and tf.limits == [("GPU:0", [{"memory_limit": 20389}])]


def test_whole_gpus_and_bad_values() -> None:
    assert gpu_share.apply({}, {"torch": FakeTorch()}) == []
    assert gpu_share.share({"CORRAL_GPU_MEMORY_FRACTION": "0.5"}) == (0.5, None)
    for bad in ("1.5", "x", "0"):
        with pytest.raises(ValueError, match="CORRAL_GPU_MEMORY_FRACTION"):
            gpu_share.share({"CORRAL_GPU_MEMORY_FRACTION": bad})
