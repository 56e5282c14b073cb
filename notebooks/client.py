"""The Corral SDK: `Client` submits jobs and returns `Job` handles at once; a Job follows, waits, explains.

    from notebooks.client import Client
    corral = Client()                     # URL and token: see notebooks.config
    job = corral.submit("nvidia-smi", gpus=1)   # queue: $CORRAL_QUEUE, else your one queue (default_queue)
    job.logs(follow=True)                 # Ctrl+C detaches: the job keeps running
    job.wait()

Every method is synchronous and runs on a private event loop in a background thread (notebooks._loop), so
the same code works in scripts, in Jupyter (whose loop is already running) and inside async functions.
"""

from __future__ import annotations

import ast
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import TracebackType
from typing import Any, TextIO

from notebooks import _payload
from notebooks._display import LogText, job_html
from notebooks._loop import LoopThread
from notebooks.aio import AsyncCorral
from notebooks.config import Connection, resolve
from notebooks.errors import CorralError, JobFailed
from notebooks.models import Models
from scheduler.service.api.models import JobView
from scheduler.service.core.states import FINISHED, JobState

__all__ = ["Client", "CorralError", "Job", "JobFailed", "detaching"]
STDERR_TAIL_LINES = 20


class Detached:
    """Set by `detaching` when Ctrl+C ended the wait: the caller returns what it has."""

    def __init__(self) -> None:
        self.happened = False


@contextmanager
def detaching(job_id: int, doing: str, out: TextIO | None = None) -> Iterator[Detached]:
    """Turn KeyboardInterrupt inside the block into a note: Ctrl+C stops watching a job, never the job."""
    flag = Detached()
    try:
        yield flag
    except KeyboardInterrupt:
        flag.happened = True
        print(
            f"\n[corral] stopped {doing} job {job_id}; it keeps running. Reattach with Client().job({job_id}), "
            f"stop it with Client().job({job_id}).cancel().",
            file=out or sys.stderr,
            flush=True,
        )


class Client:
    """A connection to the Corral API. `url` and `token` default as notebooks.config describes."""

    def __init__(self, url: str | None = None, token: str | None = None, *, python: str | None = None) -> None:
        self.connection: Connection = resolve(url, token)
        self.python = python or _payload.default_python()
        self._loop = LoopThread()
        self._api = AsyncCorral(self.connection)
        self._queue: str | None = None  # the one queue the caller may see, once asked (default_queue)

    def __repr__(self) -> str:
        return f"Client(url={self.connection.url!r})"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close connections and stop the background loop. Jobs are not affected."""
        self._loop.close(self._api.aclose())

    @property
    def api(self) -> AsyncCorral:
        """The async core, for code that runs on the client's loop (see notebooks.aio)."""
        return self._api

    @property
    def models(self) -> Models:
        """The model registry (notebooks.models): versions from finished jobs, promotions, approvals, rollback."""
        return Models(self)

    def run(self, coro: Any) -> Any:
        """Run a coroutine of `self.api` on the client's loop and return its result."""
        return self._loop.run(coro)

    def submit(
        self,
        command: str | Sequence[str] | None = None,
        *,
        script: str | os.PathLike[str] | None = None,
        function: Callable[..., Any] | None = None,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        queue: str | None = None,
        gpus: float = 1,
        workers: int = 1,
        mig: str | None = None,
        name: str | None = None,
        pool: str | None = None,
        priority: int = 0,
        preemptible: bool = True,
        env: Mapping[str, str] | None = None,
        workdir: str | None = None,
        max_runtime: float | None = None,
        labels: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        """Queue a job and return its handle at once (it does not wait for the job to start).

        Exactly one of: `command` (one string runs under /bin/sh -c; a list is the argv), `script` (runs
        `python script *args`; its working directory defaults to this one, so relative paths work when the job
        runs on this machine or a shared file system) or `function` (called as function(*args, **kwargs) in
        the job; the repr of its return value is the last line of its stdout, see Job.result()).
        A repeated `idempotency_key` returns the job first submitted with it, so re-running a cell is safe.
        `queue` defaults to default_queue(). `gpus` below 1 is a share of one GPU (0.25); `mig` one MIG slice of
        that profile ("1g.10gb") in place of `gpus`.
        """
        given = [x for x in (command, script, function) if x is not None]
        if len(given) != 1:
            raise TypeError("give exactly one of command, script= or function=")
        if args and command is not None:
            raise TypeError("args= goes with script= or function=; put a command's arguments in the command")
        if kwargs and function is None:
            raise TypeError("kwargs= goes with function=")
        argv: str | list[str]
        if function is not None:
            argv = _payload.function_command(self.python, function, args, kwargs)
            name = name or getattr(function, "__name__", None)
        elif script is not None:
            argv = _payload.script_command(self.python, script, args)
            name = name or os.path.basename(os.fspath(script))
            workdir = workdir or os.getcwd()
        else:
            argv = command if isinstance(command, str) else [str(a) for a in command or ()]
        body: dict[str, Any] = {
            "queue": queue or self.default_queue(),
            "command": argv,
            "workers": workers,
            "priority": priority,
            "preemptible": preemptible,
        }
        optional = {
            "name": name,
            "pool": pool,
            "workdir": workdir,
            "max_runtime": max_runtime,
            "idempotency_key": idempotency_key,
            "env": dict(env) if env else None,
            "labels": dict(labels) if labels else None,
        }
        body.update({k: v for k, v in optional.items() if v is not None})
        body.update({"mig": mig} if mig is not None else {"gpus": gpus})  # a slice's share follows from its profile
        data, created = self._loop.run(self._api.submit(body))
        # A repeated key returns the first job; the service refuses (CorralError conflict, naming the fields) a
        # repeated key with a different spec, so an edited cell never silently shows the old run.
        job = Job(self, data)
        job.reused = not created
        return job

    def default_queue(self) -> str:
        """The queue jobs go to when submit() is given none: CORRAL_QUEUE (Corral's sandboxes set it to the
        user's team queue), else the one leaf queue you may see (your team's; on a fresh `corral serve`,
        `default`). CorralError no_queue when you see several: pass queue=... or set CORRAL_QUEUE."""
        if os.environ.get("CORRAL_QUEUE"):
            return os.environ["CORRAL_QUEUE"]
        if self._queue is None:
            leaves = sorted(q["name"] for q in self._loop.run(self._api.queues()) if q.get("leaf"))
            if len(leaves) != 1:
                raise CorralError(
                    "no_queue",
                    "no queue given and CORRAL_QUEUE is not set, and "
                    + (
                        f"you may see {len(leaves)} queues ({', '.join(leaves[:10])})"
                        if leaves
                        else "you may see no queue"
                    )
                    + ": pass queue=... or set CORRAL_QUEUE",
                    "queue",
                )
            self._queue = leaves[0]
        return self._queue

    def job(self, job_id: int) -> Job:
        """The job with this id (CorralError not_found when it does not exist or is not yours to see)."""
        return Job(self, self._loop.run(self._api.job(int(job_id))))

    def jobs(self, queue: str | None = None, state: str | Sequence[str] | None = None, limit: int = 100) -> list[Job]:
        """Jobs you may see, newest first, optionally of one queue and in some states."""
        states = state if state is None or isinstance(state, str) else list(state)
        return [Job(self, d) for d in self._loop.run(self._api.jobs(queue, states, limit))]


class Job:
    """A handle on one job. `data` is the API's view of it as of the last refresh (status() refreshes)."""

    def __init__(self, client: Client, data: dict[str, Any]) -> None:
        self.client = client
        self.id: int = int(data["id"])
        self.data = data
        self.reused = False  # True when submit() got this job back for a repeated idempotency key

    def __repr__(self) -> str:
        return f"Job(id={self.id}, name={self.name!r}, state={self.state!r}, queue={self.queue!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Job) and other.id == self.id and other.client.connection == self.client.connection

    def __hash__(self) -> int:
        return hash((self.id, self.client.connection.url))

    @property
    def name(self) -> str:
        return str(self.data.get("name", ""))

    @property
    def queue(self) -> str:
        return str(self.data.get("queue", ""))

    @property
    def state(self) -> str:
        """The state as of the last refresh; status() asks the API."""
        return str(self.data.get("state", ""))

    def refresh(self) -> dict[str, Any]:
        self.data = self.client.run(self.client.api.job(self.id))
        return self.data

    def status(self) -> str:
        """The job's state now: pending, starting, running, completed, failed, cancelled or rejected."""
        return str(JobView.model_validate(self.refresh()).state)

    def explain(self) -> dict[str, Any]:
        """Why the job is where it is: {"state", "reason": {"rule", "message", "numbers"}, "preemptions"}."""
        result: dict[str, Any] = self.client.run(self.client.api.explain(self.id))
        return result

    def cancel(self) -> str:
        """Cancel the job (its process gets SIGTERM, then SIGKILL after the service's grace time); the state."""
        self.data = {**self.data, **self.client.run(self.client.api.cancel(self.id))}
        return self.state

    def logs(self, follow: bool = False, stream: str = "stdout", *, out: TextIO | None = None) -> LogText:
        """The latest attempt's output. With follow, print it as it comes (to `out`, default sys.stdout) until
        the job ends, and return all of it; Ctrl+C stops following (the job keeps running)."""
        if not follow:
            return LogText.of(self.client.run(self.client.api.logs(self.id, stream)), shown=False)
        target = out or sys.stdout
        parts: list[str] = []
        with detaching(self.id, "following"):
            for text in self.client._loop.iterate(self.client.api.follow(self.id, stream)):
                parts.append(text)
                target.write(text)
                target.flush()
        return LogText.of("".join(parts), shown=True)

    def wait(self, timeout: float | None = None, poll: float = 2.0) -> str:
        """Block until the job ends; return "completed". Raise JobFailed when it ends failed, cancelled or
        rejected (with its reason and the end of its stderr), TimeoutError after `timeout` seconds. Ctrl+C
        stops waiting, not the job, and returns the state the job had then."""
        with detaching(self.id, "waiting for") as d:
            self.data = {**self.data, **self.client.run(self.client.api.wait(self.id, timeout, poll))}
        if d.happened:
            return self.status()
        if self.state != JobState.COMPLETED:
            tail = ""
            if self.data.get("attempt", 0) >= 1:
                try:
                    tail = "\n".join(self.logs(stream="stderr").splitlines()[-STDERR_TAIL_LINES:])
                except CorralError:
                    tail = ""  # the failure itself is what the caller needs; a missing stderr must not hide it
            raise JobFailed(self.id, self.state, self.data.get("reason"), self.data.get("exit_code"), tail)
        return self.state

    def result(self) -> Any:
        """What a function job returned, read back from the last line of its stdout with ast.literal_eval
        (numbers, strings, lists, dicts, ... of them). Waits for the job first."""
        self.wait()
        lines = self.logs().rstrip("\n").splitlines()
        if not lines:
            raise ValueError(f"job {self.id} printed nothing; is it a function job?")
        try:
            return ast.literal_eval(lines[-1])
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
            raise ValueError(
                f"the last line of job {self.id}'s output is not a Python literal: {lines[-1][:200]!r}"
            ) from e

    def _repr_html_(self) -> str:
        # Displaying a job shows it as it is now; a broken connection must not break the notebook's display.
        note, reason = "", self.data.get("reason")
        try:
            # The API's job carries the reason it waits now (what explain says), so one request does.
            reason = self.refresh().get("reason")
        except CorralError as e:
            note = f"could not refresh: {e}"
        if (
            self.state in FINISHED
            and reason
            and reason.get("rule") not in (self.state, JobState.COMPLETED, JobState.FAILED)
        ):
            reason = None  # a finished job's stored reason can be its admission's; it no longer explains anything
        return job_html(self.data, reason, note)
