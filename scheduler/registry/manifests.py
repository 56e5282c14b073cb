"""Deployment manifests for a promoted model version, built as plain dicts (tested as dicts, dumped as YAML).

The KServe InferenceService is the main target; a plain apps/v1 Deployment serves clusters without KServe.
Both carry the model, version and artifact digest, so what runs can be traced back to the registry entry.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import yaml

PREFIX = "corral.dev"
_NOT_DNS = re.compile(r"[^a-z0-9-]+")
_NOT_LABEL = re.compile(r"[^A-Za-z0-9_.-]+")


def dns_name(model: str, max_len: int = 63) -> str:
    """A DNS-1123 label for `model`: lowercase, [a-z0-9-], starting with a letter, at most `max_len` characters.

    KServe turns the InferenceService name into Service and host names, which must start with a letter
    (DNS-1035), hence the "m-" prefix for names that start with a digit. A name cut to fit gets a hash of the
    full name as suffix, so two long names that share a prefix do not collide.
    """
    name = _NOT_DNS.sub("-", model.lower()).strip("-")
    name = re.sub(r"-{2,}", "-", name)
    if not name:
        raise ValueError(f"model name {model!r} has no letters or digits to build a Kubernetes name from")
    if not name[0].isalpha():
        name = "m-" + name
    if len(name) > max_len or name != model:
        # Normalised names could also collide ("My_Model" and "my-model"), so any change adds the suffix.
        suffix = hashlib.sha256(model.encode()).hexdigest()[:8]
        name = name[: max_len - len(suffix) - 1].rstrip("-") + "-" + suffix
    return name


def _label_value(value: str) -> str:
    """A valid label value (<= 63, alphanumeric at both ends); the exact value goes in an annotation."""
    return _NOT_LABEL.sub("-", value)[:63].strip("-_.")


def labels_for(model: str, version: int) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": dns_name(model),
        "app.kubernetes.io/managed-by": "corral",
        f"{PREFIX}/model": _label_value(model),
        f"{PREFIX}/version": str(version),
    }


def annotations_for(model: str, version: int, digest: str) -> dict[str, str]:
    # The digest (64 hex digits plus "sha256:") is too long for a label value, so it is an annotation.
    return {
        f"{PREFIX}/model": model,
        f"{PREFIX}/version": str(version),
        f"{PREFIX}/digest": digest if digest.startswith("sha256:") else f"sha256:{digest}",
    }


def _check(version: int, gpus: int, storage_uri: str) -> None:
    if version < 1:
        raise ValueError(f"version must be 1 or more, got {version}")
    if gpus < 0:
        raise ValueError(f"gpus must be 0 or more, got {gpus}")
    if not storage_uri:
        raise ValueError("storage_uri is empty")


def _gpu_resources(gpus: int) -> dict[str, Any]:
    # Extended resources take limits only (requests default to them); no GPUs means no resources entry.
    return {"limits": {"nvidia.com/gpu": gpus}} if gpus else {}


def inference_service(
    model: str,
    version: int,
    storage_uri: str,
    digest: str,
    namespace: str = "default",
    model_format: str = "pytorch",
    gpus: int = 1,
    runtime: str | None = None,
) -> dict[str, Any]:
    """A KServe v1beta1 InferenceService serving `storage_uri` for `model` at `version`.

    The name comes from the model only, so promoting the next version updates the same service in place.
    """
    _check(version, gpus, storage_uri)
    spec_model: dict[str, Any] = {"modelFormat": {"name": model_format}, "storageUri": storage_uri}
    if runtime is not None:
        spec_model["runtime"] = runtime
    if gpus:
        spec_model["resources"] = _gpu_resources(gpus)
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {
            "name": dns_name(model),
            "namespace": namespace,
            "labels": labels_for(model, version),
            "annotations": annotations_for(model, version, digest),
        },
        "spec": {"predictor": {"model": spec_model}},
    }


def deployment(
    model: str,
    version: int,
    image: str,
    storage_uri: str,
    digest: str,
    namespace: str = "default",
    gpus: int = 1,
    port: int = 8080,
    readiness_path: str = "/v2/health/ready",
) -> dict[str, Any]:
    """A plain apps/v1 Deployment (one replica) running `image`, told where the model is through the environment.

    The selector names the model only (selectors cannot change), while the pod template carries the version,
    so a promotion rolls the pods. The readiness probe defaults to the Open Inference Protocol's ready path.
    """
    _check(version, gpus, storage_uri)
    if not image:
        raise ValueError("image is empty")
    if not 0 < port < 65536:
        raise ValueError(f"port must be between 1 and 65535, got {port}")
    name = dns_name(model)
    meta_labels = labels_for(model, version)
    container: dict[str, Any] = {
        "name": "model",
        "image": image,
        "ports": [{"name": "http", "containerPort": port}],
        "env": [
            {"name": "MODEL_URI", "value": storage_uri},
            {"name": "MODEL_DIGEST", "value": annotations_for(model, version, digest)[f"{PREFIX}/digest"]},
        ],
        "readinessProbe": {
            "httpGet": {"path": readiness_path, "port": "http"},
            "initialDelaySeconds": 5,
            "periodSeconds": 10,
        },
    }
    if gpus:
        container["resources"] = _gpu_resources(gpus)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": meta_labels,
            "annotations": annotations_for(model, version, digest),
        },
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app.kubernetes.io/name": name}},
            "template": {
                "metadata": {"labels": meta_labels, "annotations": annotations_for(model, version, digest)},
                "spec": {"containers": [container]},
            },
        },
    }


def to_yaml(*docs: dict[str, Any]) -> str:
    """Multi-document YAML in the builders' key order (apiVersion, kind, metadata, spec), as kubectl expects."""
    return yaml.safe_dump_all(docs, sort_keys=False, default_flow_style=False, explicit_start=True)
