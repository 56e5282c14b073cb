"""The `corral` command line: `corral sim ...` for the simulator; the service commands (serve, submit, ps, queue,
...) come from scheduler.cli.service."""

from __future__ import annotations

import importlib.metadata
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from scheduler.cli import admission as cli_admission
from scheduler.cli import db as cli_db
from scheduler.cli import kueue as cli_kueue
from scheduler.cli import models as cli_models
from scheduler.cli import service as cli_service
from scheduler.engine.baselines import POLICIES
from scheduler.gc_tuning import tune_gc
from scheduler.sim import generate, importers, metrics, sharing
from scheduler.sim.expect import check
from scheduler.sim.inputs import InputError, World, load_cluster, load_scenario, load_trace
from scheduler.sim.runner import Simulation

app = typer.Typer(help="Corral: a GPU-aware scheduler for shared GPU pools.", no_args_is_help=True)
sim = typer.Typer(help="Replay scenarios and traces on a virtual clock.", no_args_is_help=True)
app.add_typer(sim, name="sim")
sim_generate = typer.Typer(help="Write synthetic traces and their cluster files.", no_args_is_help=True)
sim.add_typer(sim_generate, name="generate")
cli_service.register(app)
cli_models.register(app)
cli_kueue.register(app)
cli_admission.register(app)
cli_db.register(app)

out = Console()


def _version(shown: bool) -> None:
    if shown:
        print(f"corral {importlib.metadata.version('corral')}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print Corral's version and exit.")
    ] = False,
) -> None:
    """Corral: a GPU-aware scheduler for shared GPU pools."""


def bad_input(e: Exception) -> typer.Exit:
    """Bad input: one line naming the file, where and what; exit status 2."""
    print(f"error: {e}", file=sys.stderr)
    return typer.Exit(2)


def _policy(name: str) -> str:
    if name not in POLICIES:
        raise typer.BadParameter(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    return name


def _print_json(log: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(log, separators=(",", ":")))
    sys.stdout.write("\n")


def _summary(world: World, log: dict[str, Any]) -> None:
    """A readable summary: jobs by outcome, and waits and completion times per queue."""
    m = metrics.compute(world.jobs, log, sum(n.gpus for n in world.nodes))
    o = m.overall
    out.print(
        f"policy {log['policy']}: {o.jobs} jobs, {o.completed} completed, {o.rejected} rejected, "
        f"{o.cancelled} cancelled, {o.failed} failed, {o.unfinished} unfinished; {o.preemptions} preemptions",
        highlight=False,
    )
    table = Table("queue", "jobs", "started", "mean wait (s)", "p95 wait (s)", "mean JCT (s)")
    for q, st in sorted(m.queues.items()):
        table.add_row(
            q, str(st.jobs), str(st.started), f"{st.mean_wait:.1f}", f"{st.p95_wait:.1f}", f"{st.mean_jct:.1f}"
        )
    out.print(table)


@sim.command("scenario")
def sim_scenario(
    file: Annotated[Path, typer.Argument(help="scenario YAML (SIMULATOR.md)")],
    as_json: Annotated[bool, typer.Option("--json", help="print only the JSON event log")] = False,
    policy: Annotated[str, typer.Option(help=f"one of {', '.join(POLICIES)}")] = "corral",
) -> None:
    """Run a scenario; without --json, say which expectations held (exit 1 if one failed)."""
    try:
        world = load_scenario(file)
    except InputError as e:
        raise bad_input(e) from e
    log = Simulation(world, _policy(policy)).run()
    if as_json:
        _print_json(log)
        return
    out.print(f"[bold]{world.name}[/bold] ({file})")
    _summary(world, log)
    results = check(world, log)
    for what, ok, diff in results:
        out.print(
            ("[green]held[/green]   " if ok else "[red]FAILED[/red] ") + what + (f"  ({diff})" if diff else ""),
            highlight=False,
        )
    failed = sum(1 for _, ok, _ in results if not ok)
    out.print(f"{len(results) - failed}/{len(results)} expectations held")
    if failed:
        raise typer.Exit(1)


@sim.command("trace")
def sim_trace(
    trace: Annotated[Path, typer.Argument(help="trace CSV (SIMULATOR.md)")],
    cluster: Annotated[Path, typer.Option(help="cluster YAML: cluster, queues, settings")],
    policy: Annotated[str, typer.Option(help=f"one of {', '.join(POLICIES)}")] = "corral",
    as_json: Annotated[bool, typer.Option("--json", help="print only the JSON event log")] = False,
) -> None:
    """Replay a trace on a cluster under one policy."""
    try:
        world = load_cluster(cluster)
        world.jobs = load_trace(trace)
    except InputError as e:
        raise bad_input(e) from e
    tune_gc()
    log = Simulation(world, _policy(policy), log_fair_share=as_json).run()
    if as_json:
        _print_json(log)
    else:
        _summary(world, log)


@sim.command("report")
def sim_report(
    trace: Annotated[Path, typer.Argument(help="trace CSV (SIMULATOR.md)")],
    cluster: Annotated[Path, typer.Option(help="cluster YAML: cluster, queues, settings")],
    output: Annotated[Path, typer.Option("-o", "--output", help="directory for report.md and the plots")],
    policy: Annotated[list[str] | None, typer.Option(help="policy to compare (repeat); default: all")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="replay only the first N jobs of the trace")] = None,
    jobs: Annotated[int, typer.Option(min=1, help="simulations run in parallel (processes)")] = 1,
) -> None:
    """Replay a trace under several policies, and each queue alone on its quota; write a report with plots."""
    # Loaded here, not at the top, for start-up time only (no cycle): report pulls in matplotlib, which would
    # add 0.5 s to every `corral` command.
    from scheduler.sim import report  # noqa: PLC0415

    policies = [_policy(p) for p in (policy or POLICIES)]
    try:
        world = load_cluster(cluster)
        world.jobs = load_trace(trace)[:limit]
    except InputError as e:
        raise bad_input(e) from e
    tune_gc()
    rep = report.build(world, list(dict.fromkeys(policies)), workers=jobs)
    paths = report.write(rep, output, f"Policy comparison: {trace.name} on {cluster.name}")
    for line in report.summary_lines(rep):
        _say(line)
    _say("wrote " + ", ".join(str(p) for p in paths))


@sim.command("import")
def sim_import(
    fmt: Annotated[str, typer.Argument(metavar="FORMAT", help=f"one of {', '.join(importers.FORMATS)}")],
    src: Annotated[Path, typer.Argument(help="the public trace file")],
    output: Annotated[Path, typer.Option("-o", "--output", help="trace CSV to write")],
    pool: Annotated[str, typer.Option(help="the pool every job asks for")] = "philly",
    gpus_per_node: Annotated[int, typer.Option(min=1, help="node size: larger jobs become gangs of workers")] = 8,
) -> None:
    """Convert a public trace into the trace CSV of SIMULATOR.md."""
    if fmt not in importers.FORMATS:
        raise typer.BadParameter(f"unknown format {fmt!r}; choose one of {', '.join(importers.FORMATS)}")
    try:
        rows = importers.import_trace(fmt, src, importers.ImportOptions(pool, gpus_per_node))
        n = importers.write_trace(rows, output)
    except InputError as e:
        raise bad_input(e) from e
    except OSError as e:
        raise bad_input(InputError(output, "", f"cannot write the file: {e.strerror}")) from e
    work = sum(r.workers * r.gpus * r.duration for r in rows)
    span = max((r.submit for r in rows), default=0.0)
    out.print(
        f"wrote {n} jobs to {output}: submits over {span / 86400:.1f} days, {work / 3600:,.0f} GPU-hours",
        highlight=False,
        markup=False,
    )


def _say(text: str) -> None:
    """A line as written (no rich markup or highlighting, never wrapped: paths and numbers stay whole)."""
    out.print(text, highlight=False, markup=False, soft_wrap=True)


def _write_generated(write: Callable[[Path, Path], None], output: Path, cluster: Path) -> None:
    """Write a generated trace and its cluster file; a file that cannot be written is bad input (exit 2)."""
    try:
        write(output, cluster)
    except OSError as e:
        raise bad_input(InputError(e.filename or output, "", f"cannot write the file: {e.strerror}")) from e


@sim_generate.command("services")
def sim_generate_services(
    output: Annotated[Path, typer.Option("-o", "--output", help="trace CSV to write")],
    cluster: Annotated[Path, typer.Option(help="cluster YAML to write")],
    seed: Annotated[int, typer.Option(help="random seed: the same seed writes the same files")] = 1,
    teams: Annotated[int, typer.Option(min=1, help="teams (leaf queues), three to a department")] = 6,
    pools: Annotated[int, typer.Option(min=1, max=len(generate.POOL_NAMES), help="pools of 8-GPU nodes")] = 3,
    days: Annotated[float, typer.Option(min=0.01, help="days over which batch jobs arrive")] = 30.0,
    batch_per_day: Annotated[float, typer.Option(min=0, help="batch jobs a day per team (Poisson)")] = 24.0,
    starvation_timeout: Annotated[
        float, typer.Option(min=1, help="the cluster file's starvation_timeout (s)")
    ] = generate.ServicesConfig.starvation_timeout,
) -> None:
    """Teams with long-running non-preemptible services beside preemptible batch jobs, on a mostly idle cluster."""
    config = generate.ServicesConfig(
        seed=seed,
        teams=teams,
        pools=pools,
        days=days,
        batch_per_day=batch_per_day,
        starvation_timeout=starvation_timeout,
    )
    made = generate.services(config)
    _write_generated(made.write, output, cluster)
    gpus = sum(made.nodes.values()) * generate.GPUS_PER_NODE
    services = sum(1 for j in made.jobs if not j.preemptible)
    _say(
        f"wrote {len(made.jobs)} jobs ({services} services) to {output} and a cluster of {gpus} GPUs "
        f"({', '.join(f'{p}: {n} nodes' for p, n in made.nodes.items())}) to {cluster}"
    )


@sim_generate.command("sharing")
def sim_generate_sharing(
    output: Annotated[Path, typer.Option("-o", "--output", help="trace CSV to write")],
    cluster: Annotated[Path, typer.Option(help="cluster YAML to write")],
    seed: Annotated[int, typer.Option(help="random seed: the same seed writes the same files")] = 1,
    jobs: Annotated[int, typer.Option(min=1, help="jobs in the trace")] = sharing.SharingConfig.jobs,
    nodes: Annotated[int, typer.Option(min=1, help="8-GPU nodes of the one pool")] = sharing.SharingConfig.nodes,
    teams: Annotated[int, typer.Option(min=1, help="teams (leaf queues) with equal quotas")] = 4,
    load: Annotated[float, typer.Option(min=0.01, help="mean GPU demand / the pool's GPUs")] = 0.9,
    fraction_share: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="part of the jobs asking for a fraction of one GPU")
    ] = sharing.SharingConfig.fraction_share,
    starvation_timeout: Annotated[
        float, typer.Option(min=1, help="the cluster file's starvation_timeout (s)")
    ] = sharing.SharingConfig.starvation_timeout,
) -> None:
    """Fractional and whole-GPU requests in a production-like mix (after Alibaba's GPU-sharing trace, FGD)."""
    config = sharing.SharingConfig(
        seed=seed,
        jobs=jobs,
        nodes=nodes,
        teams=teams,
        load=load,
        fraction_share=fraction_share,
        starvation_timeout=starvation_timeout,
    )
    made = sharing.sharing(config)
    _write_generated(made.write, output, cluster)
    _say(
        f"wrote {len(made.jobs)} jobs ({sum(1 for j in made.jobs if j.gpus < 1)} fractional) to {output} and a "
        f"cluster of {nodes * generate.GPUS_PER_NODE} GPUs to {cluster}"
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
