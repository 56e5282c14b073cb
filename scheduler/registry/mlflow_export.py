"""Export of stage aliases to MLflow's model registry, for teams that serve from MLflow (optional: mlflow-skinny).

The service exports only to tracking URIs an admin allowed (setting mlflow_tracking_uris) and within a deadline:
MLflow's HTTP client retries a failing server with back-off for minutes by default, so each export runs with
MLflow's per-request timeout set to the deadline and no retries, in a thread the request stops waiting for once
the deadline passes.

MLflow reads that timeout and retry count from the process environment only, so `configure` sets them once, at the
service's start, from its settings (setting them per request would race between request threads). At most
MAX_EXPORTS exports run at once, counting those whose request stopped waiting: a slot comes back when the thread
really ends (within MLflow's own timeout), and an export beyond that is refused at once (ExportBusy, a 503).
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

try:
    from mlflow.tracking import MlflowClient as _Client

    MlflowClient: Any = _Client
except ImportError:  # the export is an extra; everything else works without mlflow
    MlflowClient = None

VERSION_TAG = "corral.version"
# MLflow reads these from the environment at every request (mlflow.environment_variables): the process-wide
# setting is the only knob its client offers, and nothing else in the service uses MLflow (see configure).
TIMEOUT_ENV, RETRIES_ENV = "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES"


class ExportFailed(RuntimeError):
    """The tracking server could not be reached, refused, or did not finish within the deadline."""


class ExportBusy(ExportFailed):
    """MAX_EXPORTS exports are running already."""


MAX_EXPORTS = 4  # threads exporting at once, per process: an unreachable server holds each for the timeout
_slots = threading.BoundedSemaphore(MAX_EXPORTS)
_configured = threading.Lock()


def configure(timeout_s: float) -> None:
    """MLflow's HTTP timeout (whole seconds, at least 1) and no retries, for the whole process: called once when
    the service starts, before any request can export."""
    with _configured:
        os.environ[TIMEOUT_ENV] = str(max(1, math.ceil(timeout_s)))
        os.environ[RETRIES_ENV] = "0"


def available() -> bool:
    return MlflowClient is not None


def export_aliases(
    model: str,
    versions: Sequence[Mapping[str, Any]],
    stages: Mapping[str, Mapping[str, Any]],
    tracking_uri: str,
    timeout_s: float,
) -> dict[str, int]:
    """`_export` within `timeout_s` seconds: ExportFailed naming what went wrong, or that the time passed (the
    thread is left to end on MLflow's own request timeout, set by `configure`); ExportBusy at once when
    MAX_EXPORTS are running."""
    if MlflowClient is None:
        raise RuntimeError("mlflow is not installed (pip install 'corral[mlflow]')")
    if not _slots.acquire(blocking=False):
        raise ExportBusy(
            f"{MAX_EXPORTS} MLflow exports are running already (a slow tracking server holds each "
            "for up to mlflow_timeout_s); try again shortly"
        )
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["aliases"] = _export(model, versions, stages, tracking_uri)
        except Exception as e:  # whatever MLflow or its HTTP client raises is the export's failure, reported
            result["error"] = e
        finally:
            _slots.release()  # only now: a thread the request stopped waiting for still holds its slot

    worker = threading.Thread(target=run, name="corral-mlflow-export", daemon=True)
    try:
        worker.start()
    except BaseException:
        _slots.release()
        raise
    worker.join(timeout_s)
    if worker.is_alive():
        raise ExportFailed(
            f"the MLflow export to {tracking_uri} did not finish within {timeout_s:g} s (setting mlflow_timeout_s)"
        )
    if "error" in result:
        e = result["error"]
        raise ExportFailed(f"the MLflow export to {tracking_uri} failed: {type(e).__name__}: {str(e)[:500]}") from e
    exported: dict[str, int] = result["aliases"]
    return exported


def _export(
    model: str, versions: Sequence[Mapping[str, Any]], stages: Mapping[str, Mapping[str, Any]], tracking_uri: str
) -> dict[str, int]:
    """Mirror a Corral model into MLflow: one model version per Corral version (found again by its tag, so a
    second export adds only what is new) and one alias per stage. Returns stage -> MLflow version number."""
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    if not client.search_registered_models(filter_string=f"name = '{model}'"):
        client.create_registered_model(model, tags={"corral.model": model})
    known = {mv.tags.get(VERSION_TAG): mv.version for mv in client.search_model_versions(f"name = '{model}'")}
    for v in versions:
        if str(v["version"]) not in known:
            created = client.create_model_version(
                model,
                source=v["artifact_uri"],
                run_link=None,
                tags={VERSION_TAG: str(v["version"]), "corral.digest": v["digest"], "corral.job": str(v["job_id"])},
            )
            known[str(v["version"])] = created.version
    out: dict[str, int] = {}
    for stage, alias in stages.items():
        mlflow_version = known[str(alias["version"])]
        client.set_registered_model_alias(model, stage, mlflow_version)
        out[stage] = int(mlflow_version)
    return out
