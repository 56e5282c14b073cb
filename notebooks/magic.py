"""IPython magics: run a notebook cell as a Corral job.

    %load_ext notebooks.magic

    %%corral --gpus 2 --queue team-a --name finetune
    import torch
    print(torch.cuda.device_count())

The cell's source runs as `python -c <source>` in the job (it does not see the notebook's variables: pass data
through files, or use Client.submit(function=...)). Its stdout streams into the cell until the job ends
(--no-follow returns at once); the cell's value is the Job. A failed job raises JobFailed, with the end of its
stderr, so "Run all" stops there. `%corral_status JOB` shows a job. --queue defaults to the SDK's default queue
(Client.default_queue: CORRAL_QUEUE, else the one queue you may see). The client is created at first use with
the rules of notebooks.config.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class

from notebooks.client import Client, Job
from scheduler.service.core.states import FINISHED

_client: Client | None = None


def client() -> Client:
    """The session's Client, made once: every magic shares its connection and background loop."""
    global _client
    if _client is None:
        _client = Client()
    return _client


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="%%corral",
        add_help=False,
        exit_on_error=False,
        allow_abbrev=False,
        description="Run this cell as a Corral job.",
    )
    p.add_argument("--queue", "-q", default=None)
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--name", default=None)
    p.add_argument("--pool", default=None)
    p.add_argument("--priority", type=int, default=0)
    p.add_argument("--max-runtime", type=float, default=None)
    p.add_argument("--idempotency-key", default=None)
    p.add_argument("--no-follow", action="store_true")
    return p


def parse(line: str) -> argparse.Namespace:
    """The magic's options; a mistake is a UsageError (IPython shows it as one line, not a traceback)."""
    try:
        opts, extra = parser().parse_known_args(shlex.split(line))
    except (argparse.ArgumentError, ValueError) as e:
        raise UsageError(f"%%corral: {e}") from e
    if extra:
        raise UsageError(
            f"%%corral: unknown option(s) {' '.join(extra)}; "
            "options: --queue --gpus --workers --name --pool --priority --max-runtime "
            "--idempotency-key --no-follow"
        )
    return opts


def run_cell(line: str, cell: str, corral: Client | None = None) -> Job:
    """Submit `cell` with the options in `line`; follow and wait unless --no-follow. Separate from the magic
    so it can be called (and tested) without IPython."""
    opts = parse(line)
    corral = corral or client()
    job = corral.submit(
        [corral.python, "-c", cell],
        queue=opts.queue,
        gpus=opts.gpus,
        workers=opts.workers,
        name=opts.name or "cell",
        pool=opts.pool,
        priority=opts.priority,
        max_runtime=opts.max_runtime,
        idempotency_key=opts.idempotency_key,
        labels={"source": "notebook-cell"},
    )
    what = "is the same as" if job.reused else "submitted as"
    print(
        f"[corral] cell {what} job {job.id} (queue {job.queue}); Ctrl+C stops following, not the job",
        file=sys.stderr,
        flush=True,
    )
    if opts.no_follow:
        return job
    job.logs(follow=True)  # returns when the job ends, or at Ctrl+C (then the job is left running)
    if job.status() in FINISHED:
        job.wait()  # raises JobFailed for a failed job
    return job


@magics_class
class CorralMagics(Magics):
    @cell_magic
    def corral(self, line: str, cell: str) -> Job:
        """%%corral [--queue Q] [--gpus N] [--name N] [--idempotency-key K] [--no-follow]: run the cell as a job."""
        return run_cell(line, cell)

    @line_magic
    def corral_status(self, line: str) -> Job:
        """%corral_status JOB: the job, refreshed (shown as a card)."""
        try:
            job_id = int(line.strip())
        except ValueError:
            raise UsageError(f"%corral_status takes a job id, not {line.strip()!r}") from None
        return client().job(job_id)


def load_ipython_extension(ipython: InteractiveShell) -> None:
    ipython.register_magics(CorralMagics)


def unload_ipython_extension(ipython: Any) -> None:
    # Close the shared client so a reload does not leave its loop thread behind.
    global _client
    if _client is not None:
        _client.close()
        _client = None
