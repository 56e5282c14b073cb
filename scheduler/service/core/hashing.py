"""The artifact hashing pool: a few threads that read model artifacts, so no API request thread reads a file.

A registration, promotion or rollback hands the pool a job that pre-walks its artifact
(scheduler.registry.artifacts.walk) and then hashes it, and waits at most artifact_hash_timeout_s for the digest: the
walk runs on the pool and under the timeout too, since a tree of a million empty directories costs time before a
single byte is read. The pool is bounded twice: artifact_hash_workers threads hash, and at most
artifact_hash_waiting more digests wait for one; a request beyond that is answered 503 at once. A slot is given
back only when its hash really ends (not when its request gave up waiting), so slow hashes cannot pile up behind
the bound; each ends, since the walk is bounded in entries and depth and the hash reads no more than the walk's
sizes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from scheduler.registry.artifacts import Walk, digest
from scheduler.service.api.errors import Unavailable
from scheduler.service.core.settings import ServiceSettings


class HashPool:
    """Digests computed on the pool's threads; `hash_fn` is injectable so tests can make hashing slow."""

    def __init__(self, workers: int, waiting: int, timeout_s: float, hash_fn: Callable[[Walk], str] = digest) -> None:
        self.timeout_s = timeout_s
        self.hash_fn = hash_fn
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="corral-hash")
        self._slots = threading.BoundedSemaphore(workers + waiting)

    @classmethod
    def from_settings(cls, s: ServiceSettings) -> HashPool:
        return cls(s.artifact_hash_workers, s.artifact_hash_waiting, s.artifact_hash_timeout_s)

    def _run(self, size: Callable[[], Walk]) -> str:
        try:
            return self.hash_fn(size())
        finally:
            self._slots.release()

    def submit(self, size: Callable[[], Walk]) -> Future[str]:
        """Start walking (`size`) and hashing an artifact; Unavailable at once when every slot is taken."""
        if not self._slots.acquire(blocking=False):
            raise Unavailable(
                "the service is hashing as many artifacts as it may at once; try again shortly "
                "(settings artifact_hash_workers, artifact_hash_waiting)"
            )
        try:
            return self._pool.submit(self._run, size)
        except RuntimeError:  # the pool was shut down: the slot was never used
            self._slots.release()
            raise

    def digest(self, size: Callable[[], Walk], what: str) -> str:
        """The digest of the artifact `size` walks (`what` names it), waiting at most timeout_s for walk and hash
        together; Unavailable when the pool is full or the time passes. OSError and ArtifactError from walking or
        reading the files come through as they are."""
        future = self.submit(size)
        try:
            return future.result(timeout=self.timeout_s)
        except FutureTimeout:
            raise Unavailable(
                f"walking and hashing {what} took longer than {self.timeout_s:g} s "
                "(setting artifact_hash_timeout_s); nothing was changed"
            ) from None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
