"""Adapter: the sha256 digest of a model artifact, computed at registration and again at promotion and rollback.

An artifact is taken only from inside its job's output directories (resolve), is pre-walked before any byte is
read (walk: regular files, directories and symlinks only, bounded in bytes, in entries (directories count) and in
depth), and hashed from that walk (digest), reading no more than the sizes it saw. The service runs walk and
digest together on its hashing pool, under one timeout (scheduler/service/core/hashing.py).

Everything below the output directory is reached by file descriptor (openat with O_NOFOLLOW, one component at a
time): a symlink is never followed, even one the job swaps in for a directory while the walk runs, so nothing
outside the output directory is read, sized or named in an error message.

Only local paths and file:// URIs are read; object stores (s3://, gs://, ...) would need credentials and
clients that the scheduler does not carry, so they are refused rather than trusted unverified.

This module uses only the standard library: the SDK (notebooks.outputs.tree_digest) computes digests with it, so
a job's code and data digests and the service's artifact digests are one format.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Collection, Sequence
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
        raise ValueError(
            f"artifact URI scheme {parsed.scheme!r} is not supported: only local paths and file:// "
            f"URIs can be hashed, got {uri!r}"
        )
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
    own: bool = True  # must have one link (the service's rule; a job hashing its own data allows hard links)


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
    raise ArtifactError(
        f"artifact {uri!r} is not inside the job's output directory: versions are registered "
        "only from what the job itself wrote there ($CORRAL_OUTPUT_DIR)"
    )


MAX_DEPTH = 64  # directories nested in an artifact: a model is a few levels deep; each level holds an open fd
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # no FIFO blocks the open


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symlink"),
    ):
        if test(mode):
            return name
    return "something else"


def _regular(shown: str, st: os.stat_result, own: bool = True) -> None:
    """ArtifactError unless `st` is a regular file (with one link, when `own`); `shown` names it (a path inside
    the outputs)."""
    if not stat.S_ISREG(st.st_mode):
        raise ArtifactError(
            f"{shown} is {_kind(st.st_mode)}, not a regular file: only regular files (and directories "
            "of them) are read from a job's outputs"
        )
    if own and st.st_nlink > 1:
        # A hard link can name a file that lies outside the output directory (another user's, or the server's).
        raise ArtifactError(f"{shown} has {st.st_nlink} hard links: a job's outputs must be its own copies")


def _descend(base: Path, parts: Sequence[str]) -> int:
    """A directory fd for base/parts, opened component by component from `base` (trusted as it is: an output
    directory) with O_NOFOLLOW, so a symlink anywhere below `base` leads nowhere (ELOOP/ENOTDIR)."""
    fd = os.open(base, _DIR)
    try:
        for part in parts:
            down = os.open(part, _DIR, dir_fd=fd)
            os.close(fd)
            fd = down
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_beneath(base: Path, parts: Sequence[str], shown: str, own: bool = True) -> tuple[int, os.stat_result]:
    """An fd (and its fstat) of the regular file base/parts, reached without following any symlink and without
    blocking on a FIFO; ArtifactError (naming `shown`) when it is anything but a regular file with one link.
    FileNotFoundError comes through as it is (a record a job did not write is no error)."""
    if not parts:
        raise ArtifactError(f"{shown} is not below {base}")
    parent = _descend(base, parts[:-1])
    try:
        fd = os.open(parts[-1], _FILE, dir_fd=parent)
    except FileNotFoundError:
        raise
    except OSError as e:  # ELOOP: a symlink; ENOTDIR: a directory on the way swapped for something else
        raise ArtifactError(
            f"{shown} is a symlink or lies beneath one ({e.strerror}): nothing outside the job's "
            "output directory is read through a link"
        ) from e
    finally:
        os.close(parent)
    try:
        st = os.fstat(fd)
        _regular(shown, st, own)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def _entry(rel: str, shown: Path, st: os.stat_result, base: Path, parts: tuple[str, ...], own: bool) -> Entry:
    _regular(str(shown), st, own)
    return Entry(rel, shown, st.st_size, (st.st_dev, st.st_ino), base=base, parts=parts, own=own)


def walk(
    path: Path,
    max_bytes: int,
    max_files: int,
    base: Path | None = None,
    skip: Collection[str] = (),
    max_depth: int = MAX_DEPTH,
    own: bool = True,
) -> Walk:
    """The pre-walk: every regular file and symlink under `path` with its size, refused as soon as the total
    passes `max_bytes`, the entries (files, links and directories: empty directories cost time too) pass
    `max_files` or the nesting `max_depth`, or when anything is not a regular file, a directory or a symlink
    (devices, FIFOs and sockets would block or never end). Directories named in `skip` are left out.

    `base` (a real path containing `path`: the output directory) is where everything is opened from, by file
    descriptor and without following any symlink, in this walk and again when hashing, so a directory swapped for
    a symlink meanwhile leads nowhere. None: `path` itself (its parent for a file). Error messages name paths as
    `path/REL`: never where a link would have led. `own`: files must have one link (False: the SDK hashing a
    job's own code and data, where a hard link crosses no trust boundary)."""
    if base is None:
        base = path if os.path.isdir(path) and not os.path.islink(path) else path.parent
    if path != base and base not in path.parents:
        raise ArtifactError(f"artifact {path} is not below {base}")
    top = path.relative_to(base).parts
    try:
        parent = _descend(base, top[:-1])
    except FileNotFoundError:
        raise FileNotFoundError(f"artifact not found: {path}") from None
    except OSError as e:
        raise ArtifactError(f"artifact {path} cannot be reached without following a link ({e.strerror})") from e
    try:
        st = os.lstat(top[-1], dir_fd=parent) if top else os.fstat(parent)
    except FileNotFoundError:
        os.close(parent)
        raise FileNotFoundError(f"artifact not found: {path}") from None
    if not stat.S_ISDIR(st.st_mode):
        os.close(parent)
        entry = _entry("", path, st, base, top, own)
        if entry.size > max_bytes:
            raise ArtifactError(
                f"artifact {path} is {entry.size} bytes, over the limit of {max_bytes} (setting artifact_max_bytes)"
            )
        return Walk(path, False, (entry,), entry.size)
    try:
        fd = os.open(top[-1], _DIR, dir_fd=parent) if top else os.dup(parent)
    except OSError as e:
        raise ArtifactError(f"artifact {path} changed while it was walked ({e.strerror})") from e
    finally:
        os.close(parent)
    return _walk_dir(path, fd, base, top, (max_bytes, max_files, max_depth), frozenset(skip), own)


def _listing(fd: int) -> os._ScandirIterator[str]:
    """os.scandir(fd), closing fd when it cannot be listed (the caller keeps fd only with its listing)."""
    try:
        return os.scandir(fd)
    except BaseException:
        os.close(fd)
        raise


def _walk_dir(
    path: Path, fd: int, base: Path, top: tuple[str, ...], bounds: tuple[int, int, int], skip: frozenset[str], own: bool
) -> Walk:
    """Depth first over open directory fds (one per level, at most max_depth): each subdirectory is opened from
    its parent's fd with O_NOFOLLOW right when it is listed, and checked to be the directory that was listed."""
    max_bytes, max_files, max_depth = bounds
    entries: list[Entry] = []
    total = seen = 0
    # os.scandir(fd) reads a duplicate of fd and closes it when closed itself: both are closed, on every way out.
    stack: list[tuple[int, os._ScandirIterator[str], tuple[str, ...]]] = []
    try:
        stack.append((fd, _listing(fd), ()))
        while stack:
            here, listing, rel_parts = stack[-1]
            item = next(listing, None)
            if item is None:
                stack.pop()
                listing.close()
                os.close(here)
                continue
            parts = (*rel_parts, item.name)
            rel = "/".join(parts)
            seen += 1
            if seen > max_files:
                raise ArtifactError(
                    f"artifact {path} holds more than {max_files} files and directories (setting artifact_max_files)"
                )
            try:
                st = item.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    if item.name in skip:
                        continue
                    if len(stack) >= max_depth:
                        raise ArtifactError(f"artifact {path} nests directories more than {max_depth} deep (at {rel})")
                    sub = os.open(item.name, _DIR, dir_fd=here)
                    if not os.path.samestat(os.fstat(sub), st):  # swapped between listing and opening
                        os.close(sub)
                        raise ArtifactError(f"{path / rel} changed while it was walked: not hashed")
                    stack.append((sub, _listing(sub), parts))
                elif stat.S_ISLNK(st.st_mode):
                    entries.append(Entry(rel, path / rel, link=os.readlink(item.name, dir_fd=here)))
                else:
                    entries.append(_entry(rel, path / rel, st, base, (*top, *parts), own))
                    total += st.st_size
            except ArtifactError:
                raise
            except OSError as e:  # named by its place in the artifact, never by where a link would lead
                raise ArtifactError(f"{path / rel} cannot be read ({e.strerror})") from e
            if total > max_bytes:
                raise ArtifactError(f"artifact {path} holds more than {max_bytes} bytes (setting artifact_max_bytes)")
    finally:
        for here, listing, _ in stack:
            listing.close()
            os.close(here)
    return Walk(path, True, tuple(sorted(entries, key=lambda e: e.rel)), total)


def _feed(h: hashlib._Hash, entry: Entry) -> None:
    """Hash at most the pre-walked size of the very file the pre-walk saw (same device and inode, still a regular
    file with one link), reached from its base without following a symlink."""
    try:
        fd, st = open_beneath(entry.base, entry.parts, str(entry.path), entry.own)
    except OSError as e:
        raise ArtifactError(f"{entry.path} changed since it was sized ({e.strerror}): not hashed") from e
    with os.fdopen(fd, "rb") as f:
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


def sha256_of(uri: str, max_bytes: int = 1 << 40, max_files: int = 1_000_000, skip: Collection[str] = ()) -> str:
    """Hex sha256 of the file or directory tree at `uri`, pre-walked and bounded (see walk and digest), leaving
    out directories named in `skip`; no containment check: the service uses resolve() first. The path itself is
    taken as it really is (a symlink given as the tree is followed, once); nothing below it is followed."""
    path = Path(os.path.realpath(local_path(uri)))
    return digest(walk(path, max_bytes, max_files, skip=skip))
