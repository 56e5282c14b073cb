"""What a job records about itself for the model registry, written into its output directory ($CORRAL_OUTPUT_DIR).

    from notebooks import log_metrics, record_lineage
    record_lineage(code=".", data=["data/train.csv"], eval_set="imdb-test")   # digests computed here, by the job
    ...train, evaluate...
    log_metrics({"accuracy": 0.93, "latency_p95_ms": 41})
    torch.save(model, os.path.join(os.environ["CORRAL_OUTPUT_DIR"], "model.pt"))

`corral models register NAME --job ID --artifact model.pt` then takes the artifact from that directory, the
metrics the promotion gates check from metrics.json, and the eval set and digests from lineage.json: nobody types
them in (docs/models.md). Only the standard library is used (and scheduler.registry.artifacts, which uses only it),
so a job needs nothing else installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from scheduler.engine.model import is_number
from scheduler.registry.artifacts import digest, walk

__all__ = ["OUTPUT_ENV", "log_metrics", "output_dir", "record_lineage", "tree_digest"]

OUTPUT_ENV = "CORRAL_OUTPUT_DIR"
METRICS_FILE, LINEAGE_FILE = "metrics.json", "lineage.json"
CODE_SKIP = frozenset({".git", "__pycache__", ".ipynb_checkpoints"})  # not code: git's store, caches


def output_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """`path`, else the job's output directory from $CORRAL_OUTPUT_DIR (RuntimeError outside a Corral job)."""
    where = path if path is not None else os.environ.get(OUTPUT_ENV)
    if not where:
        raise RuntimeError(f"${OUTPUT_ENV} is not set: this is not a Corral job (pass output_dir= to write elsewhere)")
    return Path(where)


def _write(directory: Path, name: str, doc: Any) -> Path:
    """Write JSON atomically (a temporary file renamed into place): the registry never reads half a file."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True, allow_nan=False)
        f.write("\n")
    os.replace(tmp, directory / name)
    return directory / name


def log_metrics(values: Mapping[str, float], output_dir: str | os.PathLike[str] | None = None) -> Path:
    """Write the evaluation metrics (name -> finite number) the promotion gates will check, as metrics.json.

    A second call replaces the file: log the final evaluation, not a running one."""
    out: dict[str, float] = {}
    for k, v in values.items():
        if not isinstance(k, str) or not 0 < len(k) <= 200:
            raise ValueError(f"metric name {k!r}: a string of 1 to 200 characters")
        if not is_number(v):
            raise ValueError(f"metric {k!r}: {v!r} is not a finite number")
        out[k] = float(v)
    return _write(_dir(output_dir), METRICS_FILE, out)


def _dir(path: str | os.PathLike[str] | None) -> Path:
    return output_dir(path)


def tree_digest(path: str | os.PathLike[str], skip: Iterable[str] = ()) -> str:
    """sha256 of a file (sha256sum's), or of a directory tree as the service digests artifacts (the same code:
    scheduler.registry.artifacts, standard library only): every file in sorted relative-path order as
    `file REL\\0SIZE\\0` then its bytes, every symlink as `link REL\\0TARGET\\0` (never followed). Directories named
    in `skip` are left out. Unlike the service, hard-linked files are hashed (a job's own data may be linked)."""
    # A path, never a URI (a directory may be named "data:v1"); no bounds: the job hashes what it chose to.
    return digest(walk(Path(os.path.realpath(path)), 1 << 62, 1 << 62, skip=frozenset(skip), own=False))


def _git(path: Path, *args: str) -> str | None:
    """A local git query (no network), None where git or the repository is not there."""
    try:
        done = subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def record_lineage(
    code: str | os.PathLike[str] | None = ".",
    data: Iterable[str | os.PathLike[str]] = (),
    eval_set: str | None = None,
    output_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Compute digests of the code (a directory or file: its tree digest, and its git commit and whether the work
    tree differs from it, when it is a git repository) and of each data file or directory, and write them with
    the eval set the metrics are measured on as lineage.json. Returns what it wrote."""
    doc: dict[str, Any] = {"code": None, "data": [], "eval_set": eval_set}
    if code is not None:
        where = Path(code).resolve()
        repo = where if where.is_dir() else where.parent
        commit = _git(repo, "rev-parse", "HEAD")
        status = _git(repo, "status", "--porcelain") if commit else None
        doc["code"] = {
            "sha256": tree_digest(where, CODE_SKIP),
            "path": str(where),
            "git_commit": commit,
            "git_dirty": None if status is None else bool(status),
        }
    doc["data"] = [{"name": str(d), "sha256": tree_digest(d)} for d in data]
    _write(_dir(output_dir), LINEAGE_FILE, doc)
    return doc
