"""Export of stage aliases to MLflow's model registry, for teams that serve from MLflow (optional: mlflow-skinny)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

try:
    from mlflow.tracking import MlflowClient as _Client

    MlflowClient: Any = _Client
except ImportError:  # the export is an extra; everything else works without mlflow
    MlflowClient = None

VERSION_TAG = "corral.version"


def available() -> bool:
    return MlflowClient is not None


def export_aliases(model: str, versions: Sequence[Mapping[str, Any]], stages: Mapping[str, Mapping[str, Any]],
                   tracking_uri: str) -> dict[str, int]:
    """Mirror a Corral model into MLflow: one model version per Corral version (found again by its tag, so a
    second export adds only what is new) and one alias per stage. Returns stage -> MLflow version number."""
    if MlflowClient is None:
        raise RuntimeError("mlflow is not installed (pip install 'corral[mlflow]')")
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    if not client.search_registered_models(filter_string=f"name = '{model}'"):
        client.create_registered_model(model, tags={"corral.model": model})
    known = {mv.tags.get(VERSION_TAG): mv.version for mv in client.search_model_versions(f"name = '{model}'")}
    for v in versions:
        if str(v["version"]) not in known:
            created = client.create_model_version(
                model, source=v["artifact_uri"], run_link=None,
                tags={VERSION_TAG: str(v["version"]), "corral.digest": v["digest"], "corral.job": str(v["job_id"])})
            known[str(v["version"])] = created.version
    out: dict[str, int] = {}
    for stage, alias in stages.items():
        mlflow_version = known[str(alias["version"])]
        client.set_registered_model_alias(model, stage, mlflow_version)
        out[stage] = int(mlflow_version)
    return out
