"""`corral models ...`: the golden path from the command line, over /v1/models (scheduler/service/api/routes_models.py).

create a model for a team's queue, apply its promotion policy, register versions from finished jobs, ask for a
promotion (every gate is printed with its evidence), approve it as another model owner, roll back, verify the
audit chain, print the serving manifest, and see the GPU-hours behind a model.

Exit status: 0 when the command did what it says; 1 when the API refused it, a promotion was rejected by a
gate, or `audit --verify` found a broken chain; 2 for usage errors (and `deploy` without --dry-run).
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Mapping, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

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
    numbers,
    read_document,
    when,
)
from scheduler.service.api.models_registry import Alias, ModelDetail, ModelList, PromotionAnswer, Roi, RolledBack
from scheduler.service.core.states import PromotionState

models_app = typer.Typer(
    help="The model registry: versions from finished jobs, gated promotions, rollback, audit.", no_args_is_help=True
)
policy_app = typer.Typer(help="A model's promotion policy (docs/models.md).", no_args_is_help=True)
models_app.add_typer(policy_app, name="policy")

STAGES = ("candidate", "staging", "production")


class Stage(StrEnum):
    STAGING = "staging"
    PRODUCTION = "production"


class Kind(StrEnum):
    KSERVE = "kserve"
    DEPLOYMENT = "deployment"


StageOpt = Annotated[Stage, typer.Option("--stage", help="staging or production.")]


def register(app: typer.Typer) -> None:
    """Add `models` to the root `corral` app."""
    app.add_typer(models_app, name="models")


# ----- helpers -----


def _alias(aliases: Mapping[str, Alias], stage: str) -> str:
    a = aliases.get(stage)
    return "-" if not a else f"v{a.version}"


def _gate_status(status: str) -> Text:
    return Text(status.upper(), style={"pass": "green", "fail": "red", "pending": "yellow"}.get(status, ""))


_STATE_STYLE = {PromotionState.PROMOTED: "green", PromotionState.REJECTED: "red", PromotionState.OPEN: "yellow"}


def show_promotion(data: dict[str, Any], output: Output) -> None:
    """A promotion's gates (the table every gate, PASS/FAIL/PENDING, with its evidence) and its state; exit 1
    when a gate rejected it, so `promote ... && deploy ...` stops there."""
    p = PromotionAnswer.model_validate(data)
    if output is not Output.TABLE:
        emit(data, output)
    else:
        c = console()
        table = Table("GATE", "STATUS", "EVIDENCE", box=None, pad_edge=False)
        for g in p.gates:
            table.add_row(*cells(g.gate, _gate_status(g.status), g.evidence))
        if p.gates:
            c.print(table)
        else:
            c.print("no gates: the stage's policy asks for none")
        c.print(
            Text.assemble(
                f"promotion {p.promotion}: {p.model} v{p.version} to {p.stage}: ",
                (p.state, _STATE_STYLE.get(p.state, "")),
            )
        )
        if p.state == PromotionState.OPEN:
            pending = [g.gate for g in p.gates if g.status == "pending"]
            # Approvals must come from another model owner: say the exact command they run.
            note(f"waiting for: {', '.join(pending)}; another model owner runs `corral models approve {p.promotion}`")
    if p.state == PromotionState.REJECTED:
        failed = [g.gate for g in p.gates if g.status == "fail"]
        fail(f"promotion {p.promotion} rejected by: {', '.join(failed)}")


def _summary(action: str, d: dict[str, Any]) -> str:
    """One line per audit entry: the full detail (policies, every gate's evidence) would make the table
    unreadable; `-o json` shows all of it."""
    try:
        if action == "model.create":
            return f"queue {d['queue']}"
        if action == "policy.apply":
            return f"policy version {d['version']}"
        if action == "version.register":
            return f"v{d['version']} from job {d['job']}, sha256 {d['digest'][:12]}, {numbers(d.get('metrics'))}"
        if action == "promotion.request":
            counts: dict[str, int] = {}
            for g in d["gates"]:
                counts[g["status"]] = counts.get(g["status"], 0) + 1
            tally = ", ".join(f"{n} {status}" for status, n in counts.items()) or "no gates"
            return f"promotion {d['promotion']}: v{d['version']} to {d['stage']} ({tally})"
        if action == "promotion.approve":
            return f"promotion {d['promotion']}"
        if action == "promotion.reject":
            return f"promotion {d['promotion']}: failed {', '.join(d['failed'])}"
        if action == "model.promote":
            was = "none" if d["previous"] is None else f"v{d['previous']}"
            return f"v{d['version']} to {d['stage']} (was {was}; promotion {d['promotion']})"
        if action == "model.rollback":
            return f"{d['stage']} back to v{d['version']} from v{d['rolled_back']}"
    except (KeyError, TypeError):
        pass  # an entry written by another version of Corral: show it as it is
    return json.dumps(d, separators=(",", ":"), sort_keys=True)


# ----- commands -----


@models_app.command("ls")
def ls(output: Fmt = Output.TABLE, url: Url = DEFAULT_URL, token: Token = None) -> None:
    """Models you may see, with the version at each stage."""
    with api(url, token) as a:
        data = a.get("/v1/models")
    if output is not Output.TABLE:
        emit(data, output)
        return
    listed = ModelList.model_validate(data).models
    if not listed:
        note("no models (create one with `corral models create NAME --queue Q`)")
        return
    table = Table("NAME", "QUEUE", *(s.upper() for s in STAGES), "CREATED", "DESCRIPTION", box=None, pad_edge=False)
    for m in listed:
        table.add_row(
            *cells(m.name, m.queue, *(_alias(m.aliases, s) for s in STAGES), when(m.created_at), m.description)
        )
    console().print(table)


@models_app.command("show")
def show(
    name: Annotated[str, typer.Argument(help="Model name.")],
    output: Fmt = Output.TABLE,
    url: Url = DEFAULT_URL,
    token: Token = None,
) -> None:
    """A model: its stages, every version with metrics and lineage, and its policy's version."""
    with api(url, token) as a:
        data = a.get(f"/v1/models/{name}")
    if output is not Output.TABLE:
        emit(data, output)
        return
    m, c = ModelDetail.model_validate(data), console()
    c.print(Text(f"{m.name} (queue {m.queue}, created by {m.created_by} {when(m.created_at)})"))
    if m.description:
        c.print(Text(m.description))
    c.print("policy: " + (f"version {m.policy.version}" if m.policy.version else "the default (none applied)"))
    stages = Table("STAGE", "VERSION", "PREVIOUS", "SINCE", box=None, pad_edge=False)
    for s in STAGES:
        at = m.aliases.get(s)
        if at:
            prev = "-" if at.previous is None else f"v{at.previous}"
            stages.add_row(*cells(s, f"v{at.version}", prev, when(at.updated_at)))
    if m.aliases:
        c.print(stages)
    versions = Table(
        "VERSION", "JOB", "METRICS", "EVAL SET", "DIGEST", "REGISTERED", "BY", "ARTIFACT", box=None, pad_edge=False
    )
    for v in m.versions:
        versions.add_row(
            *cells(
                f"v{v.version}",
                str(v.job_id),
                numbers(v.metrics),
                v.eval_set or "-",
                v.digest[:12],
                when(v.registered_at),
                v.registered_by,
                v.artifact_uri,
            )
        )
    if m.versions:
        c.print(versions)
    else:
        c.print("no versions yet (`corral models register`)")


@models_app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="Model name: letters, digits, . _ -")],
    queue: Annotated[str, typer.Option("--queue", "-q", help="The owning team's queue: its model owners promote.")],
    description: Annotated[str, typer.Option(help="What the model is for.")] = "",
    output: Fmt = Output.TABLE,
    url: Url = DEFAULT_URL,
    token: Token = None,
) -> None:
    """Create a model owned by a team's queue."""
    with api(url, token) as a:
        made = a.post("/v1/models", {"name": name, "queue": queue, "description": description})
    if output is not Output.TABLE:
        emit(made, output)
        return
    typer.echo(f"created model {made['name']} (queue {made['queue']})")


@policy_app.command("apply")
def policy_apply(
    name: Annotated[str, typer.Argument(help="Model name.")],
    file: Annotated[Path, typer.Option("--file", "-f", help="The policy, YAML or JSON: {stages: {...}}.")],
    output: Fmt = Output.TABLE,
    url: Url = DEFAULT_URL,
    token: Token = None,
) -> None:
    """Replace a model's promotion policy; the whole document is checked and refused with every problem."""
    doc = read_document(file)
    if not isinstance(doc, dict):
        fail(f"{file}: expected a mapping (stages: {{staging: ..., production: ...}})", 2)
    with api(url, token) as a:
        done = a.request("PUT", f"/v1/models/{name}/policy", json={"document": doc}).json()
    if output is not Output.TABLE:
        emit(done, output)
        return
    typer.echo(f"applied policy version {done['policy_version']} to {done['model']}")


@models_app.command("register")
def register_version(
    name: Annotated[str, typer.Argument(help="Model name.")],
    job: Annotated[int, typer.Option("--job", help="The completed job that produced the artifact.")],
    artifact: Annotated[
        str,
        typer.Option(
            "--artifact",
            help="Path inside the job's output directory (relative to it, or absolute); its sha256 is recorded.",
        ),
    ],
    # Refused (hidden): gates use only what the job recorded itself. Kept so that an old script is told why.
    metric: Annotated[list[str] | None, typer.Option("--metric", hidden=True, show_default=False)] = None,
    eval_set: Annotated[str | None, typer.Option("--eval-set", hidden=True, show_default=False)] = None,
    code: Annotated[str | None, typer.Option("--code", hidden=True, show_default=False)] = None,
    dataset: Annotated[str | None, typer.Option("--dataset", hidden=True, show_default=False)] = None,
    lineage_job: Annotated[
        list[int] | None, typer.Option("--lineage-job", help="Another job that led here (repeat).", show_default=False)
    ] = None,
    output: Fmt = Output.TABLE,
    url: Url = DEFAULT_URL,
    token: Token = None,
) -> None:
    """Register a new version from a completed job's output directory; it becomes the model's candidate.

    Its metrics are the job's metrics.json, its eval set and code and data digests the job's lineage.json."""
    typed = [
        flag
        for flag, given in (("--metric", metric), ("--eval-set", eval_set), ("--code", code), ("--dataset", dataset))
        if given
    ]
    if typed:
        fail(
            f"{', '.join(typed)}: not accepted: gates use only what the job recorded in its output directory "
            "($CORRAL_OUTPUT_DIR): metrics in metrics.json, the eval set and code and data digests in lineage.json "
            "(notebooks.outputs.log_metrics and record_lineage write them; docs/models.md)",
            2,
        )
    body: dict[str, Any] = {"job_id": job, "artifact_uri": artifact, "lineage_jobs": list(lineage_job or [])}
    with api(url, token) as a:
        made = a.post(f"/v1/models/{name}/versions", body)
    if output is not Output.TABLE:
        emit(made, output)
        return
    typer.echo(
        f"registered {made['model']} v{made['version']} from job {made['lineage']['job']} (sha256 {made['digest']})"
    )


@models_app.command("promote")
def promote(
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[int, typer.Option("--version", min=1, help="The version to promote.")],
    stage: StageOpt = Stage.PRODUCTION,
    output: Fmt = Output.TABLE,
    url: Url = DEFAULT_URL,
    token: Token = None,
) -> None:
    """Ask to promote a version; every gate is checked now and printed with its evidence.

    Promoted at once when all pass; open while approvals are pending; rejected (exit 1) when a gate fails.
    """
    with api(url, token) as a:
        data = a.post(f"/v1/models/{name}/promotions", {"version": version, "stage": stage.value})
    show_promotion(data, output)


@models_app.command("approve")
def approve(
    promotion: Annotated[int, typer.Argument(metavar="PROMOTION_ID", help="The id `models promote` printed.")],
    output: Fmt = Output.TABLE,
    url: Url = DEFAULT_URL,
    token: Token = None,
) -> None:
    """Approve an open promotion (as a model owner other than its requester); the gates are checked again."""
    with api(url, token) as a:
        data = a.post(f"/v1/promotions/{promotion}/approve")
    show_promotion(data, output)


@models_app.command("rollback")
def rollback(
    name: Annotated[str, typer.Argument(help="Model name.")],
    stage: StageOpt = Stage.PRODUCTION,
    output: Fmt = Output.TABLE,
    url: Url = DEFAULT_URL,
    token: Token = None,
) -> None:
    """Put the stage's previous version back."""
    with api(url, token) as a:
        done = a.post(f"/v1/models/{name}/rollback", {"stage": stage.value})
    if output is not Output.TABLE:
        emit(done, output)
        return
    back = RolledBack.model_validate(done)
    typer.echo(f"{back.model} {back.stage} is v{back.version} again (rolled back from v{back.previous})")


def _entries_narrow(rows: Sequence[Sequence[str]], width: int) -> None:
    """Audit entries for a terminal narrower than the table: the short columns aligned on one line, the detail
    wrapped below it, indented (a table there squeezed every column but the detail to nothing)."""
    heads = ("SEQ", "AT", "ACTOR", "ACTION", "MODEL")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(heads)]
    typer.echo("  ".join(h.ljust(w) for h, w in zip(heads, widths, strict=True)).rstrip())
    for r in rows:
        typer.echo("  ".join(v.ljust(w) for v, w in zip(r[:5], widths, strict=True)).rstrip())
        for line in textwrap.wrap(r[5], max(20, width - 4), break_on_hyphens=False):
            typer.echo(f"    {line}")


@models_app.command("audit")
def audit(
    model: Annotated[
        str | None,
        typer.Option(
            "--model", "-m", help="One model's entries (only platform admins read the whole chain).", show_default=False
        ),
    ] = None,
    verify: Annotated[
        bool,
        typer.Option("--verify", help="Check every hash link and the stage aliases; exit 1 if something is broken."),
    ] = False,
    head: Annotated[
        str | None,
        typer.Option(
            "--head",
            help="With --verify: a head hash kept earlier (logs, "
            "/metrics); the chain must still hold it (catches removed newest rows "
            "and a rewritten chain).",
            show_default=False,
        ),
    ] = None,
    output: Fmt = Output.TABLE,
    url: Url = DEFAULT_URL,
    token: Token = None,
) -> None:
    """The hash-chained history of registry actions, and its head hash (keep it to pass as --head later)."""
    if head is not None and not verify:
        fail("--head is checked by --verify: give both", 2)
    with api(url, token) as a:
        data = a.get("/v1/models/audit", model=model, verify="true" if verify else None, head=head)
    checked = data.get("verified")
    if output is not Output.TABLE:
        emit(data, output)
    else:
        rows = [
            (
                str(e["seq"]),
                when(e["at"]),
                e["actor"],
                e["action"],
                e["model"] or "",
                _summary(e["action"], e["detail"]),
            )
            for e in data["entries"]
        ]
        table = Table("SEQ", "AT", "ACTOR", "ACTION", "MODEL", "DETAIL", box=None, pad_edge=False)
        for row in rows:
            table.add_row(*cells(*row))
        c = console()
        heads = ("SEQ", "AT", "ACTOR", "ACTION", "MODEL", "DETAIL")
        needed = sum(max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(heads)) + 2 * 5 if rows else 0
        if rows and needed <= c.width:
            c.print(table)
        elif rows:  # narrower than the table (80 columns): each entry's detail on its own lines, below it
            _entries_narrow(rows, c.width)
        if checked is not None and checked["intact"]:
            # The API always checks the whole chain (each link against its neighbours), not only this model's rows.
            note(
                f"audit chain intact: {checked['entries']} entries verified"
                + (f", holding head {head[:12]}…" if head else "")
            )
        if data.get("head"):
            note(f"head: seq {data['head']['seq']} {data['head']['hash']}")
    if checked is not None and not checked["intact"]:
        for p in checked["problems"]:
            typer.echo(f"broken: {p}", err=True)
        fail(f"the audit chain is broken: {len(checked['problems'])} problem(s) in {checked['entries']} entries")


@models_app.command("deploy")
def deploy(
    name: Annotated[str, typer.Argument(help="Model name.")],
    stage: StageOpt = Stage.PRODUCTION,
    kind: Annotated[Kind, typer.Option(help="A KServe InferenceService, or a plain Deployment.")] = Kind.KSERVE,
    namespace: Annotated[str, typer.Option(help="Kubernetes namespace.")] = "default",
    image: Annotated[str | None, typer.Option(help="Serving image (Deployment).", show_default=False)] = None,
    model_format: Annotated[
        str | None, typer.Option(help="KServe model format (default pytorch).", show_default=False)
    ] = None,
    gpus: Annotated[int, typer.Option(min=0, help="GPUs per replica.")] = 1,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the manifest instead of applying it.")] = False,
    url: Url = DEFAULT_URL,
    token: Token = None,
) -> None:
    """The manifest that serves the version at a stage (its artifact pinned by digest)."""
    if not dry_run:
        # Corral runs jobs with its local backend only; nothing here talks to a Kubernetes API server, so
        # refuse before any request rather than pretend to apply.
        fail(
            "applying manifests needs the Kubernetes backend, which is not configured in this installation; "
            "use --dry-run to print the manifest and apply it yourself (e.g. `... --dry-run | kubectl apply -f -`)",
            2,
        )
    params = {
        "stage": stage.value,
        "kind": kind.value,
        "namespace": namespace,
        "image": image,
        "model_format": model_format,
        "gpus": gpus,
    }
    with api(url, token) as a:
        text = a.request(
            "GET", f"/v1/models/{name}/deploy", params={k: v for k, v in params.items() if v is not None}
        ).text
    typer.echo(text, nl=not text.endswith("\n"))


@models_app.command("roi")
def roi(
    name: Annotated[str, typer.Argument(help="Model name.")],
    output: Fmt = Output.TABLE,
    url: Url = DEFAULT_URL,
    token: Token = None,
) -> None:
    """GPU-hours spent by the jobs in each version's lineage, and by the production version's."""
    with api(url, token) as a:
        data = a.get(f"/v1/models/{name}/roi")
    if output is not Output.TABLE:
        emit(data, output)
        return
    spent = Roi.model_validate(data)
    prod = spent.production
    table = Table("VERSION", "JOBS", "GPU-HOURS", "", box=None, pad_edge=False)
    for v in spent.versions:
        table.add_row(
            *cells(
                f"v{v.version}",
                ", ".join(str(j) for j in v.jobs),
                f"{v.gpu_hours:.2f}",
                "production" if prod is not None and v.version == prod.version else "",
            )
        )
    c = console()
    if spent.versions:
        c.print(table)
    else:
        c.print("no versions yet")
    if prod is not None:
        c.print(f"production v{prod.version}: {prod.gpu_hours:.2f} GPU-hours")
