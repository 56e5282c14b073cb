"""Kueue interop: typed Kueue v1beta2 objects (models), Corral's queue tree rendered as them (export), and a thin
typed client over the Kubernetes API (client). docs/kueue.md says how the semantics map and where they differ."""

from scheduler.kueue.export import ExportError, export, export_objects, losses
from scheduler.kueue.models import (
    API_VERSION,
    ClusterQueue,
    Cohort,
    KueueObject,
    LocalQueue,
    ResourceFlavor,
    from_dict,
)

__all__ = [
    "API_VERSION",
    "ClusterQueue",
    "Cohort",
    "ExportError",
    "KueueObject",
    "LocalQueue",
    "ResourceFlavor",
    "export",
    "export_objects",
    "from_dict",
    "losses",
]
