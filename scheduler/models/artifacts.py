"""Adapter: the sha256 digest of a model artifact, computed at registration and again at promotion.

Only local paths and file:// URIs are read; object stores (s3://, gs://, ...) would need credentials and
clients that the scheduler does not carry, so they are refused rather than trusted unverified.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from urllib.parse import unquote, urlparse

_CHUNK = 1 << 20


def local_path(uri: str) -> Path:
    """The filesystem path behind `uri` (a plain path or file:// URI); ValueError for any other scheme."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"file URI {uri!r} names host {parsed.netloc!r}: only local files can be hashed")
        return Path(unquote(parsed.path))
    # A one-letter "scheme" is a Windows drive (C:\...), not a URI scheme.
    if parsed.scheme and len(parsed.scheme) > 1:
        raise ValueError(f"artifact URI scheme {parsed.scheme!r} is not supported: only local paths and file:// "
                         f"URIs can be hashed, got {uri!r}")
    return Path(uri)


def _feed(h: hashlib._Hash, path: Path) -> None:
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)


def sha256_of(uri: str) -> str:
    """Hex sha256 of a file (the same as `sha256sum`), or of a whole directory tree.

    A directory hashes every file in sorted relative-path order; each file is framed by its path and size, so
    renaming a file or moving bytes from one file to the next changes the digest. Symlinked files are read
    through; symlinked directories are not walked (that could loop) but their target path is hashed.
    """
    path = local_path(uri)
    if not path.exists():
        raise FileNotFoundError(f"artifact not found: {path}")
    h = hashlib.sha256()
    if not path.is_dir():
        _feed(h, path)
        return h.hexdigest()
    entries: list[tuple[str, Path, bool]] = []
    for dirpath, dirnames, filenames in os.walk(path):
        base = Path(dirpath)
        for d in dirnames:
            if (base / d).is_symlink():
                entries.append(((base / d).relative_to(path).as_posix(), base / d, True))
        entries += [((base / f).relative_to(path).as_posix(), base / f, False) for f in filenames]
    for rel, file, is_link in sorted(entries):
        if is_link:
            h.update(f"link {rel}\0{os.readlink(file)}\0".encode())
            continue
        h.update(f"file {rel}\0{file.stat().st_size}\0".encode())
        _feed(h, file)
    return h.hexdigest()
