"""Typed models of the Kueue objects Corral writes: ResourceFlavor, Cohort, ClusterQueue and LocalQueue, API
version kueue.x-k8s.io/v1beta2 (Kueue v0.17's storage version).

Only the spec fields Corral maps onto are modelled; `from_dict` ignores the rest (status, server-set metadata),
so objects read back from a cluster load too. Field names are snake_case here and camelCase on the wire
(`to_dict`/`from_dict`). The models check what Kueue's admission webhook would, and its CRD schema does not
(a negative nominalQuota passes the schema's quantity pattern): an exported tree is refused here, not later by a
webhook that a bare CRD install lacks.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator
from pydantic.alias_generators import to_camel

GROUP = "kueue.x-k8s.io"
VERSION = "v1beta2"
API_VERSION = f"{GROUP}/{VERSION}"
GPU = "nvidia.com/gpu"
GPU_PRODUCT = "nvidia.com/gpu.product"

# Kubernetes object names of these kinds (and cohort / cluster queue references): DNS subdomains.
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
Name = Annotated[str, Field(pattern=DNS_SUBDOMAIN, max_length=253)]
# A quantity of GPUs: whole and non-negative (Kueue's webhook rule; the CRD alone would take "-1").
Gpus = Annotated[int, Field(ge=0)]
# Any other resource's quantity (cpu "500m", memory "4Ti"): a Kubernetes quantity without a sign.
QUANTITY = r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)(([KMGTPE]i)|[numkMGTPE]|([eE][+-]?[0-9]+))?$"
Quantity = Gpus | Annotated[str, Field(pattern=QUANTITY)]

ReclaimPolicy = Literal["Never", "LowerPriority", "Any"]
BorrowPolicy = Literal["Never", "LowerPriority"]
WithinQueuePolicy = Literal["Never", "LowerPriority", "LowerOrNewerEqualPriority"]
QueueingStrategy = Literal["StrictFIFO", "BestEffortFIFO"]
StopPolicy = Literal["None", "Hold", "HoldAndDrain"]


class Model(BaseModel):
    """camelCase on the wire, immutable, and unknown fields dropped (server-set ones, or fields not modelled)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, frozen=True, extra="ignore")


class ObjectMeta(Model):
    name: Name
    namespace: Name | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    resource_version: str | None = None


class ResourceQuota(Model):
    """One resource of one flavor: nominalQuota, and how much may be borrowed / lent beyond it (None: no cap).
    Whole numbers are ints (GPUs always are); other quantities ("500m", "4Ti") stay strings, as written."""

    name: str
    nominal_quota: Quantity
    borrowing_limit: Quantity | None = None
    lending_limit: Quantity | None = None

    @field_validator("nominal_quota", "borrowing_limit", "lending_limit", mode="before")
    @classmethod
    def _quantity(cls, v: Any) -> Any:
        # The server hands back what was written: an int, or a quantity string such as "8".
        if isinstance(v, str) and re.fullmatch(r"[+-]?[0-9]+", v):
            return int(v)
        return v


class FlavorQuotas(Model):
    name: Name
    resources: list[ResourceQuota] = Field(min_length=1, max_length=64)


class ResourceGroup(Model):
    covered_resources: list[str] = Field(min_length=1, max_length=64)
    flavors: list[FlavorQuotas] = Field(min_length=1, max_length=64)


class FairSharing(Model):
    """A weight >= 0; Kueue takes it as a quantity (an int or a string such as "0.5"), never a JSON float."""

    weight: float = Field(default=1.0, ge=0)

    @field_validator("weight", mode="before")
    @classmethod
    def _parse(cls, v: Any) -> Any:
        return float(v) if isinstance(v, str) else v

    @field_validator("weight")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v) or 0 < v < 1e-9:
            raise ValueError("a weight is 0, or a finite number >= 1e-9 (Kueue's smallest)")
        return v

    @field_serializer("weight")
    def _quantity(self, v: float) -> int | str:
        # The CRD's schema is int-or-string: 2.0 goes out as 2, 0.5 as "0.5".
        return int(v) if v.is_integer() else repr(v)


class BorrowWithinCohort(Model):
    policy: BorrowPolicy = "Never"
    max_priority_threshold: int | None = None


class Preemption(Model):
    reclaim_within_cohort: ReclaimPolicy = "Never"
    borrow_within_cohort: BorrowWithinCohort | None = None
    within_cluster_queue: WithinQueuePolicy = "Never"


class ResourceFlavorSpec(Model):
    node_labels: dict[str, str] = Field(default_factory=dict, max_length=8)


class CohortSpec(Model):
    parent_name: Name | None = None
    resource_groups: list[ResourceGroup] = Field(default_factory=list, max_length=16)
    fair_sharing: FairSharing | None = None


class ClusterQueueSpec(Model):
    cohort_name: Name | None = None
    resource_groups: list[ResourceGroup] = Field(default_factory=list, max_length=16)
    # Kueue reads a missing selector as "no namespace": {} (every namespace) is what a queue tree means.
    namespace_selector: dict[str, Any] = Field(default_factory=dict)
    queueing_strategy: QueueingStrategy = "BestEffortFIFO"
    preemption: Preemption | None = None
    fair_sharing: FairSharing | None = None
    stop_policy: StopPolicy = "None"  # the CRD's default, written out so what is read back equals what was sent


class LocalQueueSpec(Model):
    cluster_queue: Name


class KueueObject(Model):
    """The shared shape: apiVersion, kind, metadata, spec. Subclasses fix `kind` and the spec type."""

    KIND: ClassVar[str] = ""
    PLURAL: ClassVar[str] = ""
    NAMESPACED: ClassVar[bool] = False

    api_version: Literal["kueue.x-k8s.io/v1beta2"] = "kueue.x-k8s.io/v1beta2"
    metadata: ObjectMeta

    @field_validator("metadata")
    @classmethod
    def _scope(cls, m: ObjectMeta) -> ObjectMeta:
        if cls.NAMESPACED and m.namespace is None:
            raise ValueError(f"a {cls.KIND} lives in a namespace: metadata.namespace is required")
        return m

    def to_dict(self) -> dict[str, Any]:
        """The object as the API takes it: camelCase, unset fields left out."""
        out: dict[str, Any] = self.model_dump(by_alias=True, exclude_none=True, mode="json")
        meta = out["metadata"]
        for key in ("labels", "annotations"):
            if not meta.get(key):
                meta.pop(key, None)
        return {"apiVersion": out.pop("apiVersion"), "kind": self.KIND, **out}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """An object as the API hands it back (extra fields ignored); its kind must be this class's."""
        if data.get("kind", cls.KIND) != cls.KIND:
            raise ValueError(f"expected kind {cls.KIND}, got {data.get('kind')!r}")
        return cls.model_validate(data)


class ResourceFlavor(KueueObject):
    KIND: ClassVar[str] = "ResourceFlavor"
    PLURAL: ClassVar[str] = "resourceflavors"
    spec: ResourceFlavorSpec = Field(default_factory=ResourceFlavorSpec)


class Cohort(KueueObject):
    KIND: ClassVar[str] = "Cohort"
    PLURAL: ClassVar[str] = "cohorts"
    spec: CohortSpec = Field(default_factory=CohortSpec)


class ClusterQueue(KueueObject):
    KIND: ClassVar[str] = "ClusterQueue"
    PLURAL: ClassVar[str] = "clusterqueues"
    spec: ClusterQueueSpec = Field(default_factory=ClusterQueueSpec)


class LocalQueue(KueueObject):
    KIND: ClassVar[str] = "LocalQueue"
    PLURAL: ClassVar[str] = "localqueues"
    NAMESPACED: ClassVar[bool] = True
    spec: LocalQueueSpec


KINDS: dict[str, type[KueueObject]] = {k.KIND: k for k in (ResourceFlavor, Cohort, ClusterQueue, LocalQueue)}


def from_dict(data: dict[str, Any]) -> KueueObject:
    """Any of the four kinds, picked by `kind`."""
    kind = data.get("kind")
    if kind not in KINDS:
        raise ValueError(f"not a Kueue kind Corral models: {kind!r} (one of {', '.join(KINDS)})")
    if data.get("apiVersion") not in (None, API_VERSION):
        raise ValueError(f"expected apiVersion {API_VERSION}, got {data.get('apiVersion')!r}")
    return KINDS[kind].from_dict(data)
