"""GPU sharing as the NVIDIA device plugin offers it on a node: time-slicing replicas and MIG resources (pure).

What a node advertises (the plugin's allocatable resources, GPU feature discovery's labels):

- Time-slicing: each physical GPU is advertised as `replicas` devices, as nvidia.com/gpu (renameByDefault false)
  or nvidia.com/gpu.shared (true), with the label nvidia.com/gpu.replicas. The node's physical GPUs are the
  advertised count over the replicas.
- MIG, strategy "mixed": nvidia.com/mig-<profile> per profile (nvidia.com/mig-1g.10gb: 7), besides nvidia.com/gpu
  for the GPUs not in MIG mode. Strategy "single" (label nvidia.com/mig.strategy=single): every GPU is cut the
  same way and its instances are advertised as nvidia.com/gpu, the profile in the product label
  (NVIDIA-H100-80GB-HBM3-MIG-1g.10gb).

What a pod asks (gpu_limits): a MIG job one instance of its profile's resource; a fractional job
max(1, round(fraction x replicas)) replicas of the shared resource (a quarter of a GPU with 4 replicas: 1; with 8:
2); a whole-GPU job gpus x replicas of it. The plugin, not Corral, picks the physical GPU behind the replicas, so
the engine's "at most 1 per GPU" holds per node: the replicas the node advertises bound the shares it runs.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

from scheduler.backends.base import GpuSharing
from scheduler.backends.mig import check_profile

log = logging.getLogger("corral.kubernetes")

GPU = "nvidia.com/gpu"
SHARED = "nvidia.com/gpu.shared"  # time-slicing with renameByDefault: true
REPLICAS_LABEL = "nvidia.com/gpu.replicas"
STRATEGY_LABEL = "nvidia.com/mig.strategy"
PRODUCT_LABEL = "nvidia.com/gpu.product"
MIG_PREFIX = "nvidia.com/mig-"
_SINGLE_PRODUCT = re.compile(r".*-MIG-(?P<profile>[^-]+)$")


def _count(text: str | None) -> int:
    """An extended resource's count ("4"); 0 for none or a quantity that is not a whole number."""
    try:
        return max(0, int(str(text))) if text is not None else 0
    except ValueError:
        return 0


def mig_resource(profile: str) -> str:
    """The device plugin's resource name of a profile (mixed strategy): nvidia.com/mig-1g.10gb."""
    return MIG_PREFIX + check_profile(profile)


def gpu_sharing(labels: Mapping[str, str], allocatable: Mapping[str, str]) -> tuple[int, GpuSharing | None]:
    """A node's physical GPUs usable whole or by fractions, and how the plugin shares them (None: plain whole
    GPUs, as before sharing)."""
    mig: dict[str, int] = {}
    for name, value in allocatable.items():
        if name.startswith(MIG_PREFIX) and _count(value) > 0:
            try:
                mig[check_profile(name.removeprefix(MIG_PREFIX))] = _count(value)
            except ValueError:
                log.warning("resource %s: not a MIG profile Corral knows; left out", name)
    if labels.get(STRATEGY_LABEL) == "single":
        m = _SINGLE_PRODUCT.fullmatch(labels.get(PRODUCT_LABEL, ""))
        count = _count(allocatable.get(GPU))
        if m is not None and count > 0:
            try:
                return 0, GpuSharing(GPU, 1, {check_profile(m["profile"]): count}, mig_single=True)
            except ValueError:
                log.warning("product %s: no MIG profile Corral knows; left out", labels.get(PRODUCT_LABEL))
                return 0, None
    resource = SHARED if _count(allocatable.get(SHARED)) > 0 else GPU
    advertised = _count(allocatable.get(resource))
    replicas = _count(labels.get(REPLICAS_LABEL)) or 1
    if advertised % replicas:
        log.warning(
            "%s: %d advertised is no multiple of %s=%d; counting %d whole GPUs",
            resource,
            advertised,
            REPLICAS_LABEL,
            replicas,
            advertised // replicas,
        )
    physical = advertised // replicas
    if resource == GPU and replicas == 1 and not mig:
        return physical, None
    return physical, GpuSharing(resource, replicas, dict(sorted(mig.items())))


def replicas_for(fraction: float, replicas: int) -> int:
    """Time-slicing replicas a share of `fraction` of a GPU asks: round(fraction x replicas), at least 1."""
    return max(1, round(fraction * replicas))


def gpu_limits(
    sharing: GpuSharing | None, gpus: int, fraction: float | None = None, mig: str | None = None
) -> dict[str, str]:
    """The GPU limits of a worker's container on a node shared as `sharing`: `gpus` whole GPUs, a share
    `fraction` of one, or one MIG instance of profile `mig`. ValueError when the node offers no such thing."""
    if mig is not None:
        if sharing is None or not sharing.mig.get(mig):
            raise ValueError(f"the node advertises no MIG {mig} instances ({MIG_PREFIX}{mig})")
        return {GPU: "1"} if sharing.mig_single else {mig_resource(mig): "1"}
    resource, replicas = (sharing.resource, sharing.replicas) if sharing is not None else (GPU, 1)
    if fraction is not None:
        if replicas <= 1:
            raise ValueError(
                f"a share of a GPU ({fraction:g}) needs time-slicing on the node (the device plugin's "
                f"{REPLICAS_LABEL} > 1), which does not share its GPUs"
            )
        return {resource: str(replicas_for(fraction, replicas))}
    if sharing is not None and sharing.mig_single:
        raise ValueError("the node's GPUs are all MIG instances (strategy single): it runs MIG jobs only")
    return {resource: str(gpus * replicas)}
