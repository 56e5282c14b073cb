"""`corral policy`: the admission policy in force, apply (with its diff), history, rollback, and test a job."""

from __future__ import annotations

import json
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
    apply_document,
    cells,
    console,
    emit,
    fail,
    print_history,
    print_rollback,
    read_document,
)
from scheduler.service.api.models import AdmissionPolicyView, AdmissionTest

policy_app = typer.Typer(
    help="Admission policies: rules (and a hook) every job and sandbox must pass.", no_args_is_help=True
)
File = Annotated[Path, typer.Option("--file", "-f", help="A YAML or JSON file.")]


def register(app: typer.Typer) -> None:
    app.add_typer(policy_app, name="policy")


def _compact(v: Any) -> str:
    return json.dumps(v, separators=(", ", ": ")) if v is not None else "-"


@policy_app.command("ls")
def policy_ls(output: Fmt = Output.TABLE, url: Url = DEFAULT_URL, token: Token = None) -> None:
    """The rules in force, one line each: where they apply and what they say."""
    with api(url, token) as a:
        data = a.get("/v1/admission")
    if output is not Output.TABLE:
        emit(data, output)
        return
    view = AdmissionPolicyView.model_validate(data)
    doc = view.document
    table = Table("RULE", "SCOPE", "SAYS", title=f"admission policy, version {view.version}", box=None, pad_edge=False)
    for r in doc.get("rules", []):
        scope = ", ".join(r["scope"]["queues"]) if r.get("scope") else "global"
        says = {k: v for k, v in r.items() if k not in ("name", "scope")}
        table.add_row(*cells(r["name"], scope, _compact(says)))
    if doc.get("hook"):
        table.add_row(*cells("hook", "global", _compact(doc["hook"])))
    console().print(table)


def show_diff(diff: list[dict[str, Any]]) -> None:
    c = console()
    for d in diff:
        style, mark = {"added": ("green", "+"), "removed": ("red", "-")}.get(d["change"], ("yellow", "~"))
        c.print(Text.assemble((f"{mark} {d['rule']}", style), f"  {_compact(d['after'] or d['before'])}"))


@policy_app.command("apply")
def policy_apply(
    file: File,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the diff; change nothing.")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Apply without asking.")] = False,
    comment: Annotated[str, typer.Option("--message", "-m", help="Why, for the history.")] = "",
    output: Fmt = Output.TABLE,
    url: Url = DEFAULT_URL,
    token: Token = None,
) -> None:
    """Replace the admission policy with a file (platform admins), after showing what changes."""
    doc = read_document(file)
    if not isinstance(doc, dict):
        fail(f"{file}: expected a mapping with a `rules` list", 2)
    apply_document(url, token, "/v1/admission", doc, comment, dry_run, yes, output, show_diff, "policy")


@policy_app.command("history")
def policy_history(output: Fmt = Output.TABLE, url: Url = DEFAULT_URL, token: Token = None) -> None:
    """Every version of the admission policy: when, who, why."""
    with api(url, token) as a:
        data = a.get("/v1/admission/history")
    print_history(data, output, "rules")


@policy_app.command("rollback")
def policy_rollback(
    version: Annotated[int, typer.Argument(min=1, help="The version to apply again.")],
    output: Fmt = Output.TABLE,
    url: Url = DEFAULT_URL,
    token: Token = None,
) -> None:
    """Apply an earlier version again (as a new version: history only grows)."""
    with api(url, token) as a:
        done = a.post("/v1/admission/rollback", {"version": version})
    print_rollback(done, version, output, show_diff)


@policy_app.command("test")
def policy_test(file: File, output: Fmt = Output.TABLE, url: Url = DEFAULT_URL, token: Token = None) -> None:
    """What the policy would do to a job spec (the file `corral submit` takes); submits nothing.
    Exit status 1 when the job would be rejected."""
    doc = read_document(file)
    if not isinstance(doc, dict):
        fail(f"{file}: expected a mapping of job fields (name, queue, gpus, command, ...)", 2)
    with api(url, token) as a:
        d = a.post("/v1/admission/test", doc)
    said = AdmissionTest.model_validate(d)
    if output is not Output.TABLE:
        emit(d, output)
    else:
        for change in said.applied:
            typer.echo(f"~ {change.rule}: {change.change}")
        r = said.rejected
        if r is None:
            typer.echo(f"allowed (policy version {said.policy_version})")
        else:
            typer.echo(f"rejected by rule {r.rule!r} (policy version {said.policy_version}): {r.message}")
    if not said.allowed:
        raise typer.Exit(1)
