"""A private asyncio loop in a daemon thread, so synchronous calls can run coroutines anywhere.

Jupyter's kernel already runs an event loop in the main thread: `asyncio.run()` there fails ("cannot be
called from a running event loop") and blocking on that loop would deadlock it. Running the SDK's coroutines
on a loop of our own, in its own thread, works the same in a script, in a notebook and inside async code.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
# Waits are sliced this finely so a Ctrl+C in the calling thread is acted on within this time, also where a
# blocked lock wait is not interrupted by signals (Windows).
SLICE_S = 0.1


class LoopThread:
    """An event loop running forever in a daemon thread (it must never keep the interpreter alive)."""

    def __init__(self, name: str = "corral-sdk") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    @property
    def closed(self) -> bool:
        return self.loop.is_closed()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the loop and return its result. Any exception in the caller's thread while it waits
        (KeyboardInterrupt) cancels the coroutine, so no request goes on running unseen, and propagates."""
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("a synchronous Corral call from the SDK's own loop would wait for itself")
        if self.closed:
            coro.close()
            raise RuntimeError("this Corral client is closed")
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            while not fut.done():
                concurrent.futures.wait([fut], timeout=SLICE_S)
        except BaseException:
            fut.cancel()
            raise
        return fut.result()

    def iterate(self, agen: AsyncIterator[T]) -> Iterator[T]:
        """The items of an async iterator, produced on the loop and handed over as they come. Leaving the
        iteration early (break, KeyboardInterrupt) cancels the producer."""
        items: queue.Queue[tuple[str, Any]] = queue.Queue()

        async def pump() -> None:
            try:
                async for item in agen:
                    items.put(("item", item))
            except asyncio.CancelledError:
                raise
            except BaseException as e:  # handed to the consumer, who re-raises it in its own thread
                items.put(("error", e))
                return
            items.put(("end", None))

        fut = asyncio.run_coroutine_threadsafe(pump(), self.loop)
        try:
            while True:
                try:
                    kind, value = items.get(timeout=SLICE_S)
                except queue.Empty:
                    continue
                if kind == "end":
                    return
                if kind == "error":
                    raise value
                yield value
        finally:
            fut.cancel()

    def close(self, final: Coroutine[Any, Any, Any] | None = None) -> None:
        """Run `final` (closing connections), then stop the loop and its thread."""
        if self.closed:
            if final is not None:
                final.close()
            return
        if final is not None:
            try:
                self.run(final)
            finally:
                self._stop()
        else:
            self._stop()

    def _stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self.loop.close()
