"""`corral serve` and the job commands (submit, ps, logs, cancel, explain), over the REST API.

The queue, cluster, usage and token commands live in scheduler/cli/cluster.py; `register` adds both to the
root `corral` app.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from scheduler.cli import cluster as cli_cluster
from scheduler.cli.client import (
    DEFAULT_URL,
    ApiError,
    Fmt,
    Output,
    Token,
    Url,
    api,
    cells,
    console,
    emit,
    fail,
    key_values,
    note,
    numbers,
    read_document,
    when,
)
from scheduler.gc_tuning import tune_gc
from scheduler.service.api.models import Explanation, JobList
from scheduler.service.core.settings import ADMIN_TOKEN_FILE, ServiceSettings
from scheduler.service.core.states import LIVE, JobState

LIVE_STATES: list[str] = list(LIVE)


def register(app: typer.Typer) -> None:
    """Add the service commands to the root `corral` app."""
    app.command("serve")(serve)
    app.command("submit")(submit)
    app.command("ps")(ps)
    app.command("logs")(logs)
    app.command("cancel")(cancel)
    app.command("explain")(explain)
    cli_cluster.register(app)


# ----- serve -----


def serve(
    gpus: Annotated[
        int | None, typer.Option(min=0, help="Declare N GPUs instead of discovering them (NVML).", show_default=False)
    ] = None,
    gpu_model: Annotated[str | None, typer.Option(help="Model name of declared GPUs.", show_default=False)] = None,
    port: Annotated[int | None, typer.Option(help="TCP port (default 8265).", show_default=False)] = None,
    host: Annotated[str | None, typer.Option(help="Listen address (default 127.0.0.1).", show_default=False)] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="SQLite file, job logs, admin token.", show_default=False)
    ] = None,
    database_url: Annotated[
        str | None, typer.Option(help="SQLAlchemy URL (default: SQLite in the data dir).", show_default=False)
    ] = None,
    demo: Annotated[
        bool | None, typer.Option("--demo/--no-demo", help="Demo queues on an empty database.", show_default=False)
    ] = None,
) -> None:
    """Run the API and the scheduler on this machine until interrupted (Ctrl-C).

    Flags left out come from CORRAL_* in the environment, then the YAML file CORRAL_CONFIG, then defaults.
    """
    given: dict[str, Any] = {
        "gpus": gpus,
        "gpu_model": gpu_model,
        "port": port,
        "host": host,
        "data_dir": data_dir,
        "database_url": database_url,
        "demo": demo,
    }
    # Only flags that were given: passing None would override CORRAL_* and the config file.
    try:
        settings = ServiceSettings(**{k: v for k, v in given.items() if v is not None})
    except (ValidationError, ValueError) as e:
        fail(f"bad settings: {e}", 2)
    # Imported here, not at the top: the service stack (SQLAlchemy, Alembic, FastAPI) takes about a second to
    # import, which every other command (a thin HTTP client) should not pay.
    from scheduler.service.core.assemble import build_app, isolation, run_uvicorn  # noqa: PLC0415
    from scheduler.service.core.ha import AlreadyRunning  # noqa: PLC0415
    from scheduler.service.store.db import NotAtHead  # noqa: PLC0415

    try:
        _, app, made = build_app(settings)
    except ValueError as e:  # settings that only turn out wrong when used (no ray_address, no OTLP exporter)
        fail(f"bad settings: {e}", 2)
    except (NotAtHead, AlreadyRunning) as e:  # `corral db upgrade` first; another instance on this SQLite file
        fail(str(e), 1)
    if made:
        note(
            f"admin token written to {settings.data_dir / ADMIN_TOKEN_FILE} (the CLI on this machine uses it; "
            "keep it private)"
        )
    note(
        f"Corral API on http://{settings.host}:{settings.port} ({settings.url.split('://')[0]}, "
        f"data in {settings.data_dir})"
    )
    if settings.backend == "local":  # who runs the jobs: a single-user service must say so where it is started
        note(f"isolation: {isolation(settings)[1]}")
    tune_gc()
    run_uvicorn(app, settings)


# ----- jobs -----

SPEC_SUFFIXES = (".yaml", ".yml", ".json")


def submit(
    args: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="FILE | -- COMMAND...",
            show_default=False,
            help="A job spec file (.yaml/.json), or after `--` the command: one argument runs under /bin/sh -c, "
            "several are the argv.",
        ),
    ] = None,
    queue: Annotated[str | None, typer.Option("--queue", "-q", help="Leaf queue.", show_default=False)] = None,
    gpus: Annotated[
        float | None,
        typer.Option(min=0, help="GPUs per worker (default 1); below 1 a share of one GPU (0.25).", show_default=False),
    ] = None,
    mig: Annotated[
        str | None, typer.Option(help="One MIG slice of this profile (1g.10gb) in place of --gpus.", show_default=False)
    ] = None,
    name: Annotated[str | None, typer.Option(help="Job name.", show_default=False)] = None,
    pool: Annotated[
        str | None, typer.Option(help="Pool (default: the service's only pool).", show_default=False)
    ] = None,
    workers: Annotated[int | None, typer.Option(min=1, help="Gang size.", show_default=False)] = None,
    priority: Annotated[int | None, typer.Option(help="-1000..1000, within the queue.", show_default=False)] = None,
    preemptible: Annotated[bool | None, typer.Option("--preemptible/--no-preemptible", show_default=False)] = None,
    env: Annotated[list[str] | None, typer.Option(help="K=V (repeat).", show_default=False)] = None,
    max_runtime: Annotated[
        float | None, typer.Option(help="Seconds; the job fails after it.", show_default=False)
    ] = None,
    label: Annotated[list[str] | None, typer.Option(help="K=V (repeat).", show_default=False)] = None,
    idempotency_key: Annotated[
        str | None,
        typer.Option(
            help="Submitting the same key again returns the first job instead of a new one.", show_default=False
        ),
    ] = None,
    workdir: Annotated[str | None, typer.Option(help="Working directory of the job.", show_default=False)] = None,
    output: Fmt = Output.TABLE,
    url: Url = DEFAULT_URL,
    token: Token = None,
) -> None:
    """Queue a job: `corral submit job.yaml`, or `corral submit --queue Q --gpus N -- python train.py`.

    Options given with a spec file override its fields. Prints the job id (-o json/yaml: the job).
    """
    words = list(args or [])
    body: dict[str, Any] = {}
    if len(words) == 1 and words[0].endswith(SPEC_SUFFIXES) and Path(words[0]).is_file():
        doc = read_document(Path(words[0]))
        if not isinstance(doc, dict):
            fail(f"{words[0]}: expected a mapping of job fields (name, queue, gpus, command, ...)", 2)
        body.update(doc)
    elif words:
        # One argument is a shell line (pipes and redirections work); several are passed as they are.
        body["command"] = words[0] if len(words) == 1 else words
    flags: dict[str, Any] = {
        "queue": queue,
        # Whole amounts as integers: the spec reads as before GPU sharing.
        "gpus": int(gpus) if gpus is not None and gpus.is_integer() else gpus,
        "mig": mig,
        "name": name,
        "pool": pool,
        "workers": workers,
        "priority": priority,
        "preemptible": preemptible,
        "max_runtime": max_runtime,
        "idempotency_key": idempotency_key,
        # The service takes absolute paths only: a relative one means this shell's directory.
        "workdir": str(Path(workdir).absolute()) if workdir else None,
    }
    body.update({k: v for k, v in flags.items() if v is not None})
    if env:
        body["env"] = {**body.get("env", {}), **key_values(env, "--env")}
    if label:
        body["labels"] = {**body.get("labels", {}), **key_values(label, "--label")}
    if "command" not in body or "queue" not in body:
        fail(
            "give a job spec file, or --queue and the command after `--` "
            "(corral submit --queue Q --gpus 1 -- python train.py)",
            2,
        )
    with api(url, token) as a:
        r = a.request("POST", "/v1/jobs", json=body)
        job = r.json()
    if output is not Output.TABLE:
        emit(job, output)
        return
    if r.status_code == 200:
        note(f"idempotency key {job['idempotency_key']!r} was used before: this is job {job['id']} ({job['state']})")
    typer.echo(job["id"])


def ps(
    queue: Annotated[str | None, typer.Option("--queue", "-q", help="Only this queue.", show_default=False)] = None,
    state: Annotated[
        list[str] | None,
        typer.Option(
            "--state",
            "-s",
            help="Only jobs in this state (repeat); default: pending, starting, running.",
            show_default=False,
        ),
    ] = None,
    owner: Annotated[str | None, typer.Option(help="Only this user's jobs.", show_default=False)] = None,
    all_states: Annotated[bool, typer.Option("--all", "-a", help="Jobs in every state.")] = False,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="At most this many, newest first.")] = 100,
    output: Fmt = Output.TABLE,
    url: Url = DEFAULT_URL,
    token: Token = None,
) -> None:
    """List jobs, newest first."""
    states = None if all_states else (state or LIVE_STATES)
    with api(url, token) as a:
        data = a.get("/v1/jobs", queue=queue, state=states, owner=owner, limit=limit)
    if output is not Output.TABLE:
        emit(data, output)
        return
    table = Table("ID", "NAME", "QUEUE", "OWNER", "STATE", "GPUS", "SUBMITTED", "WHY", box=None, pad_edge=False)
    listed = JobList.model_validate(data).jobs
    for j in listed:
        gpus = f"{j.workers}x{j.gpus // max(1, j.workers)}" if j.workers > 1 else str(j.gpus)
        shown = j.state in (JobState.PENDING, JobState.FAILED, JobState.REJECTED) and j.reason is not None
        why = j.reason.message if shown and j.reason is not None else ""
        table.add_row(*cells(str(j.id), j.name, j.queue, j.owner, _state(j.state), gpus, when(j.submitted_at), why))
    if listed:
        console().print(table)
    else:
        note("no jobs" + ("" if all_states or state else " pending or running (--all shows every state)"))


_STATE_STYLE = {
    JobState.RUNNING: "green",
    JobState.STARTING: "cyan",
    JobState.PENDING: "yellow",
    JobState.COMPLETED: "dim",
    JobState.FAILED: "red",
    JobState.REJECTED: "red",
    JobState.CANCELLED: "dim",
}


def _state(s: JobState) -> Text:
    return Text(s, style=_STATE_STYLE.get(s, ""))


def logs(
    job: Annotated[int, typer.Argument(help="Job id.")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing until the attempt ends.")] = False,
    stderr: Annotated[bool, typer.Option("--stderr", help="The job's stderr instead of its stdout.")] = False,
    attempt: Annotated[
        int | None, typer.Option(min=1, help="Attempt number (default: the latest).", show_default=False)
    ] = None,
    url: Url = DEFAULT_URL,
    token: Token = None,
) -> None:
    """Print a job's output."""
    params: dict[str, Any] = {"stream": "stderr" if stderr else "stdout", "attempt": attempt}
    with api(url, token) as a:
        if not follow:
            typer.echo(
                a.request(
                    "GET", f"/v1/jobs/{job}/logs", params={k: v for k, v in params.items() if v is not None}
                ).content,
                nl=False,
            )
            return
        with a.stream(f"/v1/jobs/{job}/logs", follow="true", **params) as chunks:
            for chunk in chunks:
                # Bytes as they come, flushed: a partial line of a progress bar shows up at once.
                typer.echo(chunk, nl=False)


def cancel(
    jobs: Annotated[list[int], typer.Argument(help="Job ids.")],
    output: Fmt = Output.TABLE,
    url: Url = DEFAULT_URL,
    token: Token = None,
) -> None:
    """Cancel jobs: pending ones leave their queue, running ones get SIGTERM, then SIGKILL after the grace period.

    Every job is tried; the exit status is 1 if any could not be cancelled.
    """
    done: list[dict[str, Any]] = []
    failed = 0
    with api(url, token) as a:
        for job in jobs:
            try:
                done.append(a.post(f"/v1/jobs/{job}/cancel"))
            except ApiError as e:
                failed += 1
                typer.echo(f"error: job {job}: {e}", err=True)
    if output is not Output.TABLE:
        emit({"jobs": done}, output)
    else:
        for j in done:
            typer.echo(f"cancelled job {j['id']} ({j['name']} in {j['queue']})")
    if failed:
        raise typer.Exit(1)


def explain(
    job: Annotated[int, typer.Argument(help="Job id.")],
    output: Fmt = Output.TABLE,
    url: Url = DEFAULT_URL,
    token: Token = None,
) -> None:
    """Why a job is where it is: the rule that blocks a pending job, with its numbers, and every preemption."""
    with api(url, token) as a:
        data = a.get(f"/v1/jobs/{job}/explain")
    if output is not Output.TABLE:
        emit(data, output)
        return
    c, why = console(), Explanation.model_validate(data)
    c.print(Text.assemble(f"job {why.job}: ", _state(why.state)))
    reason = why.reason
    if reason:
        verb = "blocked by" if why.state == JobState.PENDING else "last decision:"
        # soft_wrap: long messages wrap at the terminal's edge, not at an 80-column guess when piped.
        c.print(f"{verb} [bold]{escape(reason.rule)}[/bold]: {escape(reason.message)}", soft_wrap=True)
        if reason.numbers:
            c.print(f"  {numbers(reason.numbers)}", markup=False)
    elif why.state == JobState.PENDING:
        c.print("not blocked: it should start at the next scheduling cycle")
    pre = why.preemptions
    if pre:
        c.print(f"preempted {len(pre)} time{'s' if len(pre) != 1 else ''}:")
    for p in pre:
        by = f" by job {p.by}" if p.by else ""
        c.print(f"  {when(p.at)}  {p.cause or p.rule}{by}: {p.message}", markup=False, soft_wrap=True)
        if p.numbers:
            c.print(f"    {numbers(p.numbers)}", markup=False)
