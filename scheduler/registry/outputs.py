"""What a finished job recorded about itself in its output directory, read at registration: the evaluation
metrics the gates use (metrics.json) and the digests of the code and data it ran on (lineage.json).

The job writes them (notebooks.outputs.log_metrics and record_lineage do); nobody types them in, so a promotion
gate checks what the job measured, not what someone says it measured.

    metrics.json   {"accuracy": 0.93, "latency_p95_ms": 41}          names -> finite numbers
    lineage.json   {"code": {"sha256": "...", "git_commit": "...", "path": "..."},
                    "data": [{"name": "train.csv", "sha256": "..."}],
                    "eval_set": "imdb-test"}
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from scheduler.engine.model import is_number
from scheduler.registry.artifacts import ArtifactError, open_beneath

METRICS_FILE = "metrics.json"
LINEAGE_FILE = "lineage.json"
MAX_RECORD_BYTES = 1 << 20  # a metrics or lineage file is a few hundred bytes; a megabyte is no record, it is load
MAX_METRICS = 1000
SHA256 = r"^[0-9a-f]{64}$"


class CodeDigest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sha256: str = Field(pattern=SHA256, description="Digest of the code tree (notebooks.outputs.tree_digest).")
    git_commit: str | None = Field(None, max_length=64, pattern=r"^[0-9a-f]{7,64}$")
    git_dirty: bool | None = None
    path: str | None = Field(None, max_length=1000)


class DataDigest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=1000)
    sha256: str = Field(pattern=SHA256)


class Lineage(BaseModel):
    """lineage.json: digests the job computed of what it ran on."""

    model_config = ConfigDict(extra="forbid")

    code: CodeDigest | None = None
    data: list[DataDigest] = Field(default_factory=list, max_length=1000)
    eval_set: str | None = Field(None, min_length=1, max_length=200)


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON knows")


def _read(directory: Path, name: str) -> Any | None:
    """The JSON document `name` in `directory`, or None when the job did not write it. Read as artifacts are
    (artifacts.open_beneath): a regular file with one link, opened from the directory without following a link
    and without blocking on a FIFO, and at most MAX_RECORD_BYTES."""
    try:
        fd, _ = open_beneath(directory, (name,), name)
    except FileNotFoundError:
        return None
    except ArtifactError:
        raise
    except OSError as e:
        raise ArtifactError(f"{name} cannot be read: {e.strerror}") from e
    with os.fdopen(fd, "rb") as f:
        raw = f.read(MAX_RECORD_BYTES + 1)
    if len(raw) > MAX_RECORD_BYTES:
        raise ArtifactError(f"{name} is larger than {MAX_RECORD_BYTES} bytes")
    try:
        return json.loads(raw, parse_constant=_refuse_constant)
    except ValueError as e:
        raise ArtifactError(f"{name} is not valid JSON: {e}") from e


def read_metrics(directory: Path) -> dict[str, float] | None:
    """metrics.json as {name: number}, None when absent; ArtifactError naming what is wrong otherwise."""
    doc = _read(directory, METRICS_FILE)
    if doc is None:
        return None
    if not isinstance(doc, dict):
        raise ArtifactError(f"{METRICS_FILE} must be a JSON object of metric names to numbers")
    if len(doc) > MAX_METRICS:
        raise ArtifactError(f"{METRICS_FILE} has {len(doc)} metrics, more than {MAX_METRICS}")
    out: dict[str, float] = {}
    for k, v in doc.items():
        if not 0 < len(k) <= 200 or not is_number(v):
            raise ArtifactError(
                f"{METRICS_FILE}: {k[:200]!r}: {v!r} is not a finite number under a name of 1 to 200 characters"
            )
        out[k] = float(v)
    return out


def read_lineage(directory: Path) -> Lineage | None:
    """lineage.json, None when absent; ArtifactError naming what is wrong otherwise."""
    doc = _read(directory, LINEAGE_FILE)
    if doc is None:
        return None
    try:
        return Lineage.model_validate(doc)
    except ValidationError as e:
        where = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}" for err in e.errors())
        raise ArtifactError(f"{LINEAGE_FILE} is not valid: {where}") from e
