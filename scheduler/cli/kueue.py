"""`corral kueue export`: the queue tree as Kueue objects (ResourceFlavor, Cohort, ClusterQueue, LocalQueue,
kueue.x-k8s.io/v1beta2), for `kubectl apply -f -`. The tree comes from a queues.yaml, or from the running service
(its current version and its pools' GPUs). docs/kueue.md says what maps onto what, and what is lost."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from scheduler.cli.client import DEFAULT_URL, Output, Token, Url, api, emit, fail, note, read_document
from scheduler.kueue import ExportError, export, losses
from scheduler.kueue.export import ROOT_COHORT
from scheduler.service.api.errors import Invalid
from scheduler.service.core.queues import build_tree

kueue_app = typer.Typer(help="Kueue interop: the queue tree as Kueue's queues and cohorts.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(kueue_app, name="kueue")


def _pairs(values: list[str], what: str) -> dict[str, str]:
    """`pool=value` options (repeated, or comma-separated) as a mapping."""
    out: dict[str, str] = {}
    for item in (v for value in values for v in value.split(",") if v):
        pool, sep, value = item.partition("=")
        if not sep or not pool or not value:
            raise typer.BadParameter(f"expected POOL=VALUE, got {item!r}", param_hint=what)
        out[pool] = value
    return out


def _capacity(values: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for pool, gpus in _pairs(values, "--pools").items():
        if not gpus.isdigit():
            raise typer.BadParameter(f"{pool}: GPUs must be a whole number, got {gpus!r}", param_hint="--pools")
        out[pool] = int(gpus)
    return out


@kueue_app.command("export")
def export_cmd(
    file: Annotated[
        Path | None,
        typer.Option("--file", "-f", help="queues.yaml ({queues: [...]}); default: the service's current tree."),
    ] = None,
    pools: Annotated[
        list[str] | None, typer.Option(help="POOL=GPUS, per pool (needed with --file; default: the service's pools).")
    ] = None,
    flavor: Annotated[
        list[str] | None, typer.Option(help="POOL=FLAVOR: the ResourceFlavor's name (default: the pool's name).")
    ] = None,
    product: Annotated[
        list[str] | None, typer.Option(help="POOL=LABEL: the nodes' nvidia.com/gpu.product (default: the pool's name).")
    ] = None,
    namespace: Annotated[
        str, typer.Option(help="Namespace of each leaf's LocalQueue; {queue} is the leaf's name.")
    ] = "{queue}",
    root: Annotated[str, typer.Option(help="Name of the cohort above the top-level queues.")] = ROOT_COHORT,
    cpu: Annotated[
        list[str] | None,
        typer.Option(
            help="POOL=QUANTITY: the pool's nodes' total allocatable CPU "
            "(e.g. 512). With --memory, every queue may use the pools' CPU "
            "and memory (held by the root cohort)."
        ),
    ] = None,
    memory: Annotated[
        list[str] | None, typer.Option(help="POOL=QUANTITY: the pool's nodes' total allocatable memory (e.g. 4Ti).")
    ] = None,
    output: Annotated[
        Output, typer.Option("-o", "--output", help="yaml (a multi-document stream) or json (a List).")
    ] = Output.YAML,
    url: Url = DEFAULT_URL,
    token: Token = None,
) -> None:
    """Render the queue tree as Kueue objects on stdout; what Kueue cannot express is noted on stderr."""
    if output is Output.TABLE:
        raise typer.BadParameter("choose yaml or json", param_hint="--output")
    if file is not None:
        if not pools:
            raise typer.BadParameter("give the pools' sizes with --file", param_hint="--pools")
        document = read_document(file)
        if not isinstance(document, dict):
            fail(f"{file}: expected a mapping with a `queues` list", 2)
        capacity = _capacity(pools)
    else:
        with api(url, token) as a:
            versions = a.get("/v1/queues/history")["versions"]
            live = {p["name"]: int(p["capacity"]) for p in a.get("/v1/pools")["pools"]}
        if not versions:
            fail("the service has no queue tree yet")
        document = versions[-1]["document"]
        capacity = _capacity(pools) if pools else live
    try:
        tree = build_tree(document, capacity)
    except Invalid as e:
        fail(str(e), 2)
    flavors = {p: p for p in capacity} | _pairs(flavor or [], "--flavor")
    cpus, mems = _pairs(cpu or [], "--cpu"), _pairs(memory or [], "--memory")
    pool_resources: dict[str, dict[str, int | str]] | None = None
    if cpus or mems:
        pool_resources = {
            p: {
                **({"cpu": _number(cpus[p])} if p in cpus else {}),
                **({"memory": _number(mems[p])} if p in mems else {}),
            }
            for p in {*cpus, *mems}
        }
    try:
        objects = export(
            tree,
            flavors,
            lambda q: namespace.replace("{queue}", q.name),
            products=_pairs(product or [], "--product"),
            root=root,
            pool_resources=pool_resources,
        )
    except ExportError as e:
        fail(f"the tree cannot be exported to Kueue: {e}", 2)
    if pool_resources is None:
        note(
            "note: only nvidia.com/gpu is covered: Kueue leaves a job whose pods request cpu or memory pending "
            "unless its Configuration has resources.excludeResourcePrefixes: [cpu, memory], or give --cpu and "
            "--memory (docs/kueue.md)"
        )
    for loss in losses(tree, flavors):
        note(f"note: {loss}")
    if output is Output.JSON:
        emit({"apiVersion": "v1", "kind": "List", "items": objects}, output)
    else:
        typer.echo(_yaml_stream(objects), nl=False)


def _number(quantity: str) -> int | str:
    return int(quantity) if quantity.isdigit() else quantity


def _yaml_stream(objects: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(objects, sort_keys=False, explicit_start=True)
