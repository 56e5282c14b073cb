"""Adapter: the sha256 digest of a model artifact, computed at registration and again at promotion and rollback.

An artifact is taken only from inside its job's output directories (resolve), is pre-walked before any byte is
read (walk: regular files, directories and symlinks only, bounded in bytes and files), and hashed from that walk
(digest), reading no more than the sizes it saw.

Only local paths and file:// URIs are read; object stores (s3://, gs://, ...) would need credentials and
clients that the scheduler does not carry, so they are refused rather than trusted unverified.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
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


class ArtifactError(ValueError):
    """The artifact cannot be taken: outside the job's outputs, a special file, too large, or unreadable."""


@dataclass(frozen=True)
class Entry:
    """One thing in an artifact, as the pre-walk saw it: a regular file (its size and identity) or a symlink."""

    rel: str  # path relative to the artifact's root ("" for a single-file artifact)
    path: Path
    size: int = 0
    ident: tuple[int, int] = (0, 0)  # (st_dev, st_ino): the file read later must be this very file
    link: str | None = None  # a symlink's target text, hashed as text and never followed
    base: Path = Path("/")  # the directory trusted as it is (an output directory); `parts` lead from it to the file
    parts: tuple[str, ...] = ()


@dataclass(frozen=True)
class Walk:
    """What hashing will read, fixed before any byte is read: the files, their sizes, the total."""

    root: Path
    is_dir: bool
    entries: tuple[Entry, ...]
    total: int


def inside(path: Path, roots: Sequence[Path]) -> Path | None:
    """The root (real path) that `path`'s real path lies in, if any. Both sides are resolved with realpath, so a
    symlink anywhere on the way, or a `..`, is judged by where it really leads."""
    real = os.path.realpath(path)
    for root in roots:
        real_root = os.path.realpath(root)
        if real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep):
            return Path(real_root)
    return None


def resolve(uri: str, roots: Sequence[Path]) -> Path:
    """The real path of artifact `uri` (relative to an output directory, or absolute inside one), which must lie
    in one of `roots` (the output directories of the job's attempts); ArtifactError otherwise.

    The answer is a real path (no symlinks left in it), so what is hashed now and again at promotion or rollback
    is the same place, and a symlink planted later cannot redirect it."""
    path = local_path(uri)
    candidates = [path] if path.is_absolute() else [root / path for root in roots]
    for candidate in candidates:
        if inside(candidate, roots) is not None and os.path.lexists(os.path.realpath(candidate)):
            return Path(os.path.realpath(candidate))
    if any(inside(c, roots) is not None for c in candidates):
        raise ArtifactError(f"artifact {uri!r} not found in the job's output directory")
    raise ArtifactError(f"artifact {uri!r} is not inside the job's output directory: versions are registered "
                        "only from what the job itself wrote there ($CORRAL_OUTPUT_DIR)")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _regular(path: Path, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise ArtifactError(f"{path} is {_kind(st.st_mode)}: an artifact holds only regular files and directories")
    if st.st_nlink > 1:
        # A hard link can name a file that lies outside the output directory (another user's, or the server's).
        raise ArtifactError(f"{path} has {st.st_nlink} hard links: an artifact's files must be its own copies")


def _file(rel: str, path: Path, st: os.stat_result, base: Path) -> Entry:
    _regular(path, st)
    return Entry(rel, path, st.st_size, (st.st_dev, st.st_ino), base=base, parts=path.relative_to(base).parts)


def walk(path: Path, max_bytes: int, max_files: int, base: Path | None = None) -> Walk:
    """The pre-walk: every regular file and symlink under `path` (never following a link) with its size, refused
    as soon as the total passes `max_bytes` or the count `max_files`, or when anything is not a regular file, a
    directory or a symlink (devices, FIFOs and sockets would block or never end).

    `base` (a real path containing `path`: the output directory) is where hashing starts opening each file,
    component by component without following any symlink, so a directory swapped for a symlink between the walk
    and the hash leads nowhere. None: `path` itself (its parent for a file)."""
    if base is None:
        base = path if os.path.isdir(path) and not os.path.islink(path) else path.parent
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"artifact not found: {path}") from None
    if not stat.S_ISDIR(st.st_mode):
        entry = _file("", path, st, base)
        if entry.size > max_bytes:
            raise ArtifactError(f"artifact {path} is {entry.size} bytes, over the limit of {max_bytes} "
                                "(setting artifact_max_bytes)")
        return Walk(path, False, (entry,), entry.size)
    entries: list[Entry] = []
    total = 0
    stack = [path]
    while stack:
        here = stack.pop()
        with os.scandir(here) as it:
            for item in it:
                full = Path(item.path)
                rel = full.relative_to(path).as_posix()
                st = os.lstat(full)
                if stat.S_ISDIR(st.st_mode):
                    stack.append(full)
                    continue
                if stat.S_ISLNK(st.st_mode):
                    entries.append(Entry(rel, full, link=os.readlink(full)))
                else:
                    entries.append(_file(rel, full, st, base))
                    total += st.st_size
                if len(entries) > max_files:
                    raise ArtifactError(f"artifact {path} holds more than {max_files} files "
                                        "(setting artifact_max_files)")
                if total > max_bytes:
                    raise ArtifactError(f"artifact {path} holds more than {max_bytes} bytes "
                                        "(setting artifact_max_bytes)")
    return Walk(path, True, tuple(sorted(entries, key=lambda e: e.rel)), total)


def _open_beneath(entry: Entry) -> int:
    """Open the entry's file from its base, one component at a time, following no symlink anywhere on the way
    (O_NOFOLLOW on every directory and on the file) and never blocking on a FIFO (O_NONBLOCK)."""
    if not entry.parts:
        raise ArtifactError(f"{entry.path} is not below {entry.base}")
    fd = os.open(entry.base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in entry.parts[:-1]:
            down = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = down
        return os.open(entry.parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=fd)
    except OSError as e:
        raise ArtifactError(f"{entry.path} changed since it was sized ({e.strerror}): not hashed") from e
    finally:
        os.close(fd)


def _feed(h: hashlib._Hash, entry: Entry) -> None:
    """Hash at most the pre-walked size of the very file the pre-walk saw (same device and inode, still a regular
    file with one link), reached from its base without following a symlink."""
    fd = _open_beneath(entry)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        _regular(entry.path, st)
        if (st.st_dev, st.st_ino) != entry.ident:
            raise ArtifactError(f"{entry.path} changed while it was hashed")
        left = entry.size
        while left > 0 and (chunk := f.read(min(_CHUNK, left))):
            h.update(chunk)
            left -= len(chunk)


def digest(w: Walk) -> str:
    """Hex sha256 of a pre-walked artifact: a single file's is `sha256sum`'s; a directory's covers every entry in
    sorted relative-path order, each file framed by its path and size (so renaming a file or moving bytes from
    one file to the next changes the digest) and each symlink by its path and target text."""
    h = hashlib.sha256()
    if not w.is_dir:
        _feed(h, w.entries[0])
        return h.hexdigest()
    for e in w.entries:
        if e.link is not None:
            h.update(f"link {e.rel}\0{e.link}\0".encode())
            continue
        h.update(f"file {e.rel}\0{e.size}\0".encode())
        _feed(h, e)
    return h.hexdigest()


def sha256_of(uri: str, max_bytes: int = 1 << 40, max_files: int = 1_000_000) -> str:
    """Hex sha256 of the file or directory tree at `uri`, pre-walked and bounded (see walk and digest); no
    containment check: the service uses resolve() first."""
    return digest(walk(local_path(uri), max_bytes, max_files))
