"""The artifact hashing pool: a few threads that read model artifacts, so no API request thread reads a file.

A registration, promotion or rollback hands its pre-walked artifact (scheduler.models.artifacts.walk) to the pool
and waits at most artifact_hash_timeout_s for the digest. The pool is bounded twice: artifact_hash_workers
threads hash, and at most artifact_hash_waiting more digests wait for one; a request beyond that is answered
503 at once. A slot is given back only when its hash really ends (not when its request gave up waiting), so
slow hashes cannot pile up behind the bound; each ends, since it reads no more than its pre-walked size.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from scheduler.models.artifacts import Walk, digest
from scheduler.service.core import Core
from scheduler.service.errors import Unavailable
from scheduler.service.settings import ServiceSettings


class HashPool:
    """Digests computed on the pool's threads; `hash_fn` is injectable so tests can make hashing slow."""

    def __init__(self, workers: int, waiting: int, timeout_s: float,
                 hash_fn: Callable[[Walk], str] = digest) -> None:
        self.timeout_s = timeout_s
        self.hash_fn = hash_fn
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="corral-hash")
        self._slots = threading.BoundedSemaphore(workers + waiting)

    @classmethod
    def from_settings(cls, s: ServiceSettings) -> HashPool:
        return cls(s.artifact_hash_workers, s.artifact_hash_waiting, s.artifact_hash_timeout_s)

    def _run(self, w: Walk) -> str:
        try:
            return self.hash_fn(w)
        finally:
            self._slots.release()

    def submit(self, w: Walk) -> Future[str]:
        """Start hashing `w`; Unavailable at once when every slot is taken."""
        if not self._slots.acquire(blocking=False):
            raise Unavailable("the service is hashing as many artifacts as it may at once; try again shortly "
                              "(settings artifact_hash_workers, artifact_hash_waiting)")
        try:
            return self._pool.submit(self._run, w)
        except RuntimeError:  # the pool was shut down: the slot was never used
            self._slots.release()
            raise

    def digest(self, w: Walk) -> str:
        """The digest of `w`, waiting at most timeout_s; Unavailable when the pool is full or the time passes.
        OSError and ArtifactError from reading the files come through as they are."""
        future = self.submit(w)
        try:
            return future.result(timeout=self.timeout_s)
        except FutureTimeout:
            raise Unavailable(f"hashing {w.root} ({w.total} bytes) took longer than {self.timeout_s:g} s "
                              "(setting artifact_hash_timeout_s); nothing was changed") from None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


_pools: weakref.WeakKeyDictionary[Core, HashPool] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def pool(core: Core) -> HashPool:
    """The core's hashing pool, made from its settings at first use (one per service: tests build many)."""
    with _lock:
        found = _pools.get(core)
        if found is None:
            found = _pools[core] = HashPool.from_settings(core.settings)
        return found


def use(core: Core, hp: HashPool) -> None:
    """Give `core` this pool (tests: one whose hashing is slow)."""
    with _lock:
        _pools[core] = hp
