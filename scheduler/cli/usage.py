"""`corral usage` (GPU-hours; the recorded history as a simulator trace) and `corral queue recommend`."""

from __future__ import annotations

import enum
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.table import Table

from scheduler.cli.client import (
    DEFAULT_URL,
    Fmt,
    Output,
    Token,
    Url,
    api,
    cells,
    console,
    emit,
    fail,
    note,
    parse_time,
    when,
)
from scheduler.service.api.models import Usage
from scheduler.sim.inputs import InputError, World, load_cluster, load_trace
from scheduler.sim.recommend import Outcome, Proposal, Rule, compare, propose
from scheduler.sim.recorded import Demand

usage_app = typer.Typer(
    help="GPU-hours per queue and per user, and how idle each pool was (`corral usage`); "
    "the recorded history as a simulator trace (`corral usage export`).",
    invoke_without_command=True,
)

Since = Annotated[
    str | None,
    typer.Option(
        help="Start: epoch seconds, ISO date, or back from now (24h, 7d). Default: the beginning.", show_default=False
    ),
]
Until = Annotated[str | None, typer.Option(help="End, in the same forms. Default: now.", show_default=False)]


def _range(since: str | None, until: str | None) -> tuple[float | None, float | None]:
    now = time.time()
    return (
        parse_time(since, now) if since is not None else None,
        parse_time(until, now) if until is not None else None,
    )


@usage_app.callback()
def usage(
    ctx: typer.Context,
    since: Since = None,
    until: Until = None,
    output: Fmt = Output.TABLE,
    url: Url = DEFAULT_URL,
    token: Token = None,
) -> None:
    """GPU-hours per queue and per user, and how idle each pool was."""
    if ctx.invoked_subcommand is not None:
        return
    start, end = _range(since, until)
    with api(url, token) as a:
        data = a.get("/v1/usage", since=start, until=end)
    if output is not Output.TABLE:
        emit(data, output)
        return
    c, used = console(), Usage.model_validate(data)
    c.print(f"GPU-hours from {when(used.since) if used.since else 'the beginning'} to {when(used.until)}")
    for title, rows in (
        ("QUEUE", [(r.queue, r.gpu_hours) for r in used.queues]),
        ("USER", [(r.user, r.gpu_hours) for r in used.users]),
    ):
        table = Table(title, "GPU-HOURS", box=None, pad_edge=False)
        for name, hours in rows:
            table.add_row(*cells(name, f"{hours:.2f}"))
        if rows:
            c.print(table)
    table = Table("POOL", "CAPACITY", "HELD", "IDLE", "IDLE %", box=None, pad_edge=False)
    for p in used.pools:
        cap = p.capacity_gpu_hours
        idle = f"{100 * p.idle_gpu_hours / cap:.0f}%" if cap else "-"
        table.add_row(*cells(p.pool, f"{cap:.2f}", f"{p.held_gpu_hours:.2f}", f"{p.idle_gpu_hours:.2f}", idle))
    c.print(table)


class ExportFormat(enum.StrEnum):
    TRACE = "trace"


def fetch_export(url: str, token: str | None, since: str | None, until: str | None) -> dict[str, Any]:
    start, end = _range(since, until)
    with api(url, token) as a:
        data: dict[str, Any] = a.get("/v1/usage/export", format=ExportFormat.TRACE.value, since=start, until=end)
    return data


def _write(path: Path, text: str) -> None:
    try:
        path.write_text(text)
    except OSError as e:
        fail(f"{path}: cannot write the file: {e.strerror}", 2)


@usage_app.command("export")
def usage_export(
    fmt: Annotated[ExportFormat, typer.Option("--format", help="trace: the trace CSV of SIMULATOR.md.")],
    since: Since = None,
    until: Until = None,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Trace CSV to write (default: stdout).", show_default=False)
    ] = None,
    cluster_out: Annotated[
        Path | None,
        typer.Option(
            help="Also write the cluster file (pools, the queue tree, settings) for `corral sim trace --cluster`.",
            show_default=False,
        ),
    ] = None,
    url: Url = DEFAULT_URL,
    token: Token = None,
) -> None:
    """The jobs Corral recorded in a range as a simulator trace (submit times from the range's start, recorded
    runtimes), for `corral sim trace` and `corral sim report`."""
    data = fetch_export(url, token, since, until)
    if output is None:
        sys.stdout.write(data["trace"])
    else:
        _write(output, data["trace"])
    if cluster_out is not None:
        _write(cluster_out, yaml.safe_dump(data["cluster"], sort_keys=False))
    skipped = ", ".join(f"{n} {why}" for why, n in data["skipped"].items())
    note(
        f"{data['jobs']} jobs submitted from {when(data['since'])} to {when(data['until'])}"
        + (f" (left out: {skipped})" if skipped else "")
        + (f" -> {output}" if output else "")
    )
    for w in data["warnings"]:
        note(f"warning: {w}")


# ----- queue recommend -----


def _world(data: dict[str, Any]) -> World:
    """The export read back by the simulator's own parsers (the path `corral sim trace` takes)."""
    with tempfile.TemporaryDirectory(prefix="corral-recommend-") as d:
        trace, cluster = Path(d) / "trace.csv", Path(d) / "cluster.yaml"
        trace.write_text(data["trace"])
        cluster.write_text(yaml.safe_dump(data["cluster"], sort_keys=False))
        try:
            world = load_cluster(cluster)
            world.jobs = load_trace(trace)
        except InputError as e:
            fail(f"the recorded history does not replay: {e}")
    return world


def _dur(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    return f"{seconds / 60:.1f}m" if seconds < 7200 else f"{seconds / 3600:.1f}h"


def _arrow(before: str, after: str) -> str:
    return before if before == after else f"{before} -> {after}"


def queue_recommend(
    since: Since = None,
    until: Until = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "-o",
            "--output",
            help="Write the proposed tree as a queues.yaml for `corral queue apply -f`.",
            show_default=False,
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the proposal and the replays as JSON.")] = False,
    idle_below: Annotated[
        float,
        typer.Option(
            min=0, max=1, help="A queue gives guarantee when it held on average less than this share of its quota."
        ),
    ] = Rule.idle_below,
    headroom: Annotated[
        float, typer.Option(min=0, help="A giving queue keeps its mean use x (1 + headroom).")
    ] = Rule.headroom,
    min_waiting: Annotated[
        float,
        typer.Option(min=0, help="GPU-hours of waiting above which a queue counts as waiting (asks, never gives)."),
    ] = Rule.min_waiting_gpu_hours,
    url: Url = DEFAULT_URL,
    token: Token = None,
) -> None:
    """Propose a quota tree from the jobs Corral recorded (guarantees that sat idle go to queues that waited, the
    same GPUs in total), and replay those jobs under the current and the proposed tree to show what changes."""
    data = fetch_export(url, token, since, until)
    if data["scope"] is not None:
        fail(
            f"your token sees only the queues under {data['scope']}, and a recommendation moves guarantee across "
            "the whole tree: ask a platform admin"
        )
    world = _world(data)
    demand = [Demand(**d) for d in data["demand"]]
    hours = (data["until"] - data["since"]) / 3600
    try:
        proposal = propose(
            data["cluster"]["queues"], world.tree.capacity, demand, hours, Rule(idle_below, headroom, min_waiting)
        )
    except ValueError as e:  # QuotaError too: the tree in force does not fit the GPUs recorded now
        fail(f"no recommendation: {e}")
    outcomes = compare(world, proposal.queues) if proposal.changes else []
    if output is not None and proposal.changes:
        _write(output, yaml.safe_dump(proposal.document, sort_keys=False))
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "since": data["since"],
                    "until": data["until"],
                    "jobs": len(world.jobs),
                    "changes": [vars(c) for c in proposal.changes],
                    "proposal": proposal.document,
                    "replay": [vars(o) for o in outcomes],
                    "warnings": data["warnings"],
                },
                indent=2,
            )
        )
        return
    _print(data, world, proposal, outcomes, output)


def _print(
    data: dict[str, Any], world: World, proposal: Proposal, outcomes: list[Outcome], output: Path | None
) -> None:
    c = console()
    for w in data["warnings"]:
        note(f"warning: {w}")
    span = f"{when(data['since'])} to {when(data['until'])}"
    if not proposal.changes:
        c.print(f"no change recommended: from {span} no queue left its guarantee idle while another waited")
        return
    table = Table(
        "QUEUE",
        "POOL",
        "QUOTA",
        "WHY",
        box=None,
        pad_edge=False,
        title_justify="left",
        title=f"proposed quotas (same GPUs in total), from {span}",
    )
    for ch in proposal.changes:
        table.add_row(*cells(ch.queue, ch.pool, f"{ch.before} -> {ch.after}", ch.why))
    c.print(table)
    table = Table(
        "QUEUE",
        "JOBS",
        "MEAN WAIT",
        "P95 WAIT",
        "GPU-HOURS",
        box=None,
        pad_edge=False,
        title_justify="left",
        title=f"replay of {len(world.jobs)} recorded jobs: current -> proposed",
    )
    for o in outcomes:
        table.add_row(
            *cells(
                o.queue,
                str(o.jobs),
                _arrow(_dur(o.mean_wait_before), _dur(o.mean_wait_after)),
                _arrow(_dur(o.p95_wait_before), _dur(o.p95_wait_after)),
                _arrow(f"{o.gpu_hours_before:.1f}", f"{o.gpu_hours_after:.1f}"),
            )
        )
    c.print(table)
    if output is not None:
        c.print(f"wrote {output}: apply it with `corral queue apply -f {output}`")
