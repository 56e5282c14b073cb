"""The cluster commands of `corral`: queue (ls, apply, history, rollback), top and token create; usage and queue
recommend come from scheduler/cli/usage.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from scheduler.cli import usage as cli_usage
from scheduler.cli.client import (
    DEFAULT_URL,
    Fmt,
    Output,
    Token,
    Url,
    api,
    apply_document,
    cells,
    console,
    emit,
    fail,
    note,
    print_history,
    print_rollback,
    read_document,
)
from scheduler.service.api.models import JobList, PoolList, QueueTreeView, QueueView
from scheduler.service.core.settings import ServiceSettings
from scheduler.service.core.states import PLACED

queue_app = typer.Typer(
    help="The queue tree: quotas, limits and weights per pool; changes and their history.", no_args_is_help=True
)
token_app = typer.Typer(help="API tokens.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(queue_app, name="queue")
    app.add_typer(token_app, name="token")
    app.command("top")(top)
    app.add_typer(cli_usage.usage_app, name="usage")
    queue_app.command("recommend")(cli_usage.queue_recommend)


# ----- queues -----


def tree_order(queues: list[QueueView]) -> Iterator[tuple[int, QueueView]]:
    """Queues parent before children, with their depth. A queue whose parent the caller cannot see (a scoped
    token) is shown as a root."""
    names = {q.name for q in queues}
    children: dict[str | None, list[QueueView]] = {}
    for q in queues:
        children.setdefault(q.parent if q.parent in names else None, []).append(q)

    def walk(parent: str | None, depth: int) -> Iterator[tuple[int, QueueView]]:
        for q in children.get(parent, []):
            yield depth, q
            yield from walk(q.name, depth + 1)

    return walk(None, 0)


def _limit(v: int | None) -> str:
    return "-" if v is None else str(v)


def _weight(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float | int) else str(v)


@queue_app.command("ls")
def queue_ls(output: Fmt = Output.TABLE, url: Url = DEFAULT_URL, token: Token = None) -> None:
    """The queue tree with, per pool, quota, limit, weight, fair share, usage (and its non-preemptible part) and
    backlog."""
    with api(url, token) as a:
        data = a.get("/v1/queues")
    if output is not Output.TABLE:
        emit(data, output)
        return
    tree = QueueTreeView.model_validate(data)
    table = Table(
        "QUEUE",
        "POOL",
        "QUOTA",
        "LIMIT",
        "WEIGHT",
        "FAIR SHARE",
        "USAGE",
        "NP USAGE",
        "BORROWED",
        "PENDING",
        "RUNNING",
        title=f"queue tree, version {tree.version}",
        box=None,
        pad_edge=False,
    )
    for depth, q in tree_order(tree.queues):
        label = "  " * depth + q.name
        for i, (pool, p) in enumerate(sorted(q.pools.items())):
            table.add_row(
                *cells(
                    label if i == 0 else "",
                    pool,
                    str(p.quota),
                    _limit(p.limit),
                    _weight(p.weight),
                    f"{p.fair_share:g}",
                    str(p.usage),
                    str(p.np_usage),
                    str(p.borrowed),
                    f"{p.pending_jobs} ({p.pending_gpus} GPUs)",
                    str(p.running_jobs),
                )
            )
    console().print(table)


def show_diff(diff: list[dict[str, Any]]) -> None:
    """+ added, - removed, ~ changed field: before -> after; one line per queue or field."""
    c = console()
    for d in diff:
        name = d["queue"]
        if d["change"] == "added":
            c.print(Text.assemble((f"+ {name}", "green"), f"  {_fields(d['after'])}"))
        elif d["change"] == "removed":
            c.print(Text.assemble((f"- {name}", "red"), f"  {_fields(d['before'])}"))
        else:
            for f, ba in d["fields"].items():
                change = f"  {f}: {_value(ba['before'])} -> {_value(ba['after'])}"
                c.print(Text.assemble((f"~ {name}", "yellow"), change))


def _fields(q: dict[str, Any]) -> str:
    return "  ".join(f"{k}: {_value(v)}" for k, v in q.items() if v not in (None, {}, 1.0))


def _value(v: Any) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_weight(x)}" for k, x in v.items()) + "}"
    return "-" if v is None else _weight(v)


@queue_app.command("apply")
def queue_apply(
    file: Annotated[Path, typer.Option("--file", "-f", help="queues.yaml: {queues: [...]}, the whole tree.")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the diff; change nothing.")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Apply without asking.")] = False,
    comment: Annotated[str, typer.Option("--message", "-m", help="Why, for the history.")] = "",
    output: Fmt = Output.TABLE,
    url: Url = DEFAULT_URL,
    token: Token = None,
) -> None:
    """Replace the whole queue tree with a file, after showing what changes."""
    doc = read_document(file)
    if not isinstance(doc, dict):
        fail(f"{file}: expected a mapping with a `queues` list", 2)
    apply_document(url, token, "/v1/queues", doc, comment, dry_run, yes, output, show_diff, "tree")


@queue_app.command("history")
def queue_history(output: Fmt = Output.TABLE, url: Url = DEFAULT_URL, token: Token = None) -> None:
    """Every version of the queue tree: when, who, why."""
    with api(url, token) as a:
        data = a.get("/v1/queues/history")
    print_history(data, output, "queues")


@queue_app.command("rollback")
def queue_rollback(
    version: Annotated[int, typer.Argument(min=1, help="The version to apply again.")],
    output: Fmt = Output.TABLE,
    url: Url = DEFAULT_URL,
    token: Token = None,
) -> None:
    """Apply an earlier version again (as a new version: history only grows)."""
    with api(url, token) as a:
        done = a.post("/v1/queues/rollback", {"version": version})
    print_rollback(done, version, output, show_diff)


# ----- cluster -----


def top(output: Fmt = Output.TABLE, url: Url = DEFAULT_URL, token: Token = None) -> None:
    """GPUs per pool (each GPU and its job) and queues (usage against quota and fair share, non-preemptible use
    against quota, backlog)."""
    with api(url, token) as a:
        pools_data = a.get("/v1/pools")
        tree_data = a.get("/v1/queues")
        jobs = JobList.model_validate(a.get("/v1/jobs", state=list(PLACED), limit=1000)).jobs
    if output is not Output.TABLE:
        emit({"pools": pools_data["pools"], "queues": tree_data["queues"]}, output)
        return
    pools, tree = PoolList.model_validate(pools_data).pools, QueueTreeView.model_validate(tree_data)
    by_id = {j.id: j for j in jobs}
    c = console()
    for p in pools:
        gpus = Table(
            "NODE",
            "GPU",
            "MODEL",
            "JOB",
            "NAME",
            "QUEUE",
            "OWNER",
            box=None,
            pad_edge=False,
            title=f"pool {p.name}: {p.capacity} GPUs, {p.free} free",
            title_justify="left",
        )
        for n in p.nodes:
            mark = " (down)" if not n.up else " (cordoned)" if n.cordoned else ""
            for g in n.gpus:
                # A shared GPU: a row per share, its job with the share it holds ("12 (0.25)").
                holders: list[tuple[int | str | None, str]] = [(s.job, f" ({s.fraction:g})") for s in g.shares]
                holders = holders or [(g.job, "")]
                for job, share in holders:
                    j = by_id.get(job) if isinstance(job, int) else None
                    held = "-" if job is None else f"{job}{share}"  # "hidden": another team's job
                    gpus.add_row(
                        *cells(
                            n.name + mark,
                            str(g.index),
                            g.model or "-",
                            held,
                            *((j.name, j.queue, j.owner) if j else ("", "", "")),
                        )
                    )
            for m in n.mig:  # MIG slices per profile: a row per slice held, one for the free ones
                for job in m.jobs:
                    j = by_id.get(job) if isinstance(job, int) else None
                    row = (j.name, j.queue, j.owner) if j else ("", "", "")
                    gpus.add_row(*cells(n.name + mark, f"MIG {m.profile}", "-", str(job), *row))
                if m.free:
                    gpus.add_row(
                        *cells(n.name + mark, f"MIG {m.profile}", "-", f"{m.free} of {m.slices} free", "", "", "")
                    )
        c.print(gpus)
    queues = Table(
        "QUEUE",
        "POOL",
        "USAGE",
        "QUOTA",
        "NP/QUOTA",
        "FAIR SHARE",
        "BORROWED",
        "PENDING",
        box=None,
        pad_edge=False,
        title="queues",
        title_justify="left",
    )
    for depth, q in tree_order(tree.queues):
        for pool, s in sorted(q.pools.items()):
            if not (s.quota or s.usage or s.pending_jobs):
                continue  # a queue with nothing in this pool is noise here (queue ls shows it)
            # Borrowed GPUs are the ones a reclaim preempts first: make them stand out.
            used = Text(str(s.usage), style="yellow" if s.borrowed else "")
            # A guarantee all held by non-preemptible work refuses the team's next notebook: make it stand out.
            np = Text(f"{s.np_usage}/{s.quota}", style="red" if s.np_usage >= s.quota > 0 else "")
            queues.add_row(
                *cells(
                    "  " * depth + q.name,
                    pool,
                    used,
                    str(s.quota),
                    np,
                    f"{s.fair_share:g}",
                    str(s.borrowed),
                    f"{s.pending_jobs} ({s.pending_gpus} GPUs)",
                )
            )
    c.print(queues)


# ----- tokens -----


@token_app.command("create")
def token_create(
    user: Annotated[str, typer.Option(help="Who the token is for.")],
    role: Annotated[str, typer.Option(help="platform-admin, team-admin, member, model-owner or viewer.")],
    scope: Annotated[
        str | None, typer.Option(help="A queue: the role applies to its subtree (default: all).", show_default=False)
    ] = None,
    output: Fmt = Output.TABLE,
    url: Url = DEFAULT_URL,
    token: Token = None,
    local: Annotated[
        bool,
        typer.Option(
            "--local",
            help=(
                "Write the token straight into the service's database, without the API: on the server machine, as its "
                "service account. The way back when no platform-admin token works."
            ),
        ),
    ] = False,
    data_dir: Annotated[
        Path | None,
        typer.Option(help="With --local: the service's data directory (its SQLite file).", show_default=False),
    ] = None,
    database_url: Annotated[
        str | None, typer.Option(help="With --local: the service's database URL.", show_default=False)
    ] = None,
) -> None:
    """Make an API token. Its secret is printed once: Corral keeps only a hash."""
    if local:
        made = _local_token(user, role, scope, data_dir, database_url)
    else:
        with api(url, token) as a:
            made = a.request("POST", "/v1/tokens", json={"user": user, "role": role, "scope": scope}).json()
    if output is not Output.TABLE:
        emit(made, output)
        return
    # The secret alone on stdout (for `$(corral token create ...)`); the explanation on stderr.
    note(
        f"token {made['id']} for {made['user']} ({made['role']}, {made['scope'] or 'every queue'}); "
        "it is shown only now:"
    )
    typer.echo(made["token"])


def _local_token(
    user: str, role: str, scope: str | None, data_dir: Path | None, database_url: str | None
) -> dict[str, Any]:
    """`token create --local`: the settings as `corral serve` reads them (flags, CORRAL_*, CORRAL_CONFIG), then the
    token written into that database directly."""
    # Imported here, not at the top: SQLAlchemy and the service's tables take most of a second to import, which
    # the other commands (thin HTTP clients) should not pay; the same reason as `corral serve`'s import.
    from scheduler.service.core import local_tokens  # noqa: PLC0415

    given: dict[str, Any] = {"data_dir": data_dir, "database_url": database_url}
    try:
        settings = ServiceSettings(**{k: v for k, v in given.items() if v is not None})
    except ValueError as e:  # pydantic's ValidationError is a ValueError
        fail(f"bad settings: {e}", 2)
    try:
        made = local_tokens.make(settings, user, role, scope)
    except local_tokens.LocalTokenError as e:
        fail(str(e), 1)
    return {
        "id": made.id,
        "user": made.user,
        "role": made.role.value,
        "scope": made.scope,
        "token": made.secret,
        "expires_at": made.expires_at,
    }
