"""What-if: replay a trace on a cluster under a queue file with several policies, as `corral sim report` does,
and show its tables and plots, so a platform team can try a quota change before applying it.

Runs go to one worker thread (one simulation at a time, a few waiting): the simulator is CPU-bound and must not
slow the scheduling loop down by more than one core. Inputs are bounded (file size, number of jobs).
"""

from __future__ import annotations

import secrets
import shutil
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from markdown_it import MarkdownIt

from scheduler.engine.baselines import POLICIES
from scheduler.service.api.auth import Principal
from scheduler.sim import report
from scheduler.sim.inputs import InputError, load_cluster, load_scenario, load_trace

MAX_UPLOAD = 2 * 1024 * 1024  # bytes per file: a 2 MiB trace is about 40,000 jobs, more than MAX_JOBS anyway
# The form's whole body: a trace, a cluster and a queue tree (uploaded or typed in), each up to MAX_UPLOAD, and fields.
MAX_FORM = 4 * MAX_UPLOAD + 64 * 1024
WHATIF_PATH = "/ui/whatif"
MAX_JOBS = 5000  # jobs replayed: a few seconds per policy, so a run finishes while someone waits for it
MAX_WAITING = 3  # runs queued behind the one running; more are refused ("busy") rather than piling up
KEEP = 20  # finished runs kept (oldest dropped, with their files)
PLOTS = ("wait_cdf.png", "gpus_in_use.png", "idle_wait.png")
EXAMPLES = Path(__file__).resolve().parents[4] / "examples"  # present in a source checkout only
SCENARIO_ONLY = ("jobs", "events", "expect", "name", "description")  # keys a cluster file does not have


@dataclass
class Run:
    id: str
    user: str
    title: str
    outdir: Path
    state: str = "queued"  # queued, running, done, failed
    error: str | None = None
    html: str = ""
    summary: list[str] = field(default_factory=list)
    submitted: float = field(default_factory=time.time)
    seconds: float | None = None


@dataclass
class Inputs:
    """What the form gave: each file as bytes with the name it is shown under."""

    trace: tuple[str, bytes]
    cluster: tuple[str, bytes]
    queues: tuple[str, bytes] | None
    policies: list[str]
    limit: int


class WhatIf:
    """The runs of one service: a worker thread, and the last KEEP runs with their reports."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="corral-whatif")
        self.runs: OrderedDict[str, Run] = OrderedDict()
        self.lock = threading.Lock()

    def start(self, who: Principal, inputs: Inputs) -> Run:
        with self.lock:
            waiting = sum(1 for r in self.runs.values() if r.state in ("queued", "running"))
            if waiting > MAX_WAITING:
                raise Busy(f"{waiting} what-if runs are queued or running; try again when one has finished")
            run_id = secrets.token_hex(8)
            title = f"{inputs.trace[0]} on {inputs.cluster[0]}" + (f" with {inputs.queues[0]}" if inputs.queues else "")
            run = Run(run_id, who.user, title, self.workdir / run_id)
            self.runs[run_id] = run
            while len(self.runs) > KEEP:
                _, old = self.runs.popitem(last=False)
                shutil.rmtree(old.outdir, ignore_errors=True)
        self.pool.submit(self._run, run, inputs)
        return run

    def get(self, who: Principal, run_id: str) -> Run | None:
        """A run its author (or a platform admin) may see: the inputs may hold another team's quotas."""
        run = self.runs.get(run_id)
        return run if run is not None and (run.user == who.user or who.admin) else None

    def mine(self, who: Principal) -> list[Run]:
        return [r for r in reversed(self.runs.values()) if r.user == who.user or who.admin]

    def _run(self, run: Run, inputs: Inputs) -> None:
        run.state, began = "running", time.monotonic()
        try:
            world = prepare(run.outdir / "inputs", inputs)
            rep = report.build(world, inputs.policies, workers=1)
            report.write(rep, run.outdir, f"What-if: {run.title}")
            run.html = render((run.outdir / "report.md").read_text(), f"/ui/whatif/{run.id}/")
            run.summary = report.summary_lines(rep)
            run.state = "done"
        except InputError as e:
            run.state, run.error = "failed", str(e).replace(str(run.outdir / "inputs") + "/", "")
        except Exception as e:  # the worker must survive any run; the page says what went wrong
            run.state, run.error = "failed", f"{e.__class__.__name__}: {e}"
        run.seconds = time.monotonic() - began


class Busy(Exception):
    pass


def prepare(where: Path, inputs: Inputs) -> Any:
    """The simulator's World: the cluster file with its queues replaced by the queue file, and the trace's jobs
    (a CSV trace, or the jobs of a scenario file). Input errors name the file as the user called it."""
    where.mkdir(parents=True, exist_ok=True)
    cluster_name, cluster_text = inputs.cluster
    try:
        doc = yaml.safe_load(cluster_text)
    except yaml.YAMLError as e:
        raise InputError(cluster_name, "", f"not YAML: {e}") from e
    if not isinstance(doc, dict):
        raise InputError(cluster_name, "", "expected a cluster file (a mapping with cluster, queues, settings)")
    doc = {k: v for k, v in doc.items() if k not in SCENARIO_ONLY}  # a scenario serves as a cluster file too
    if inputs.queues is not None:
        qname, qtext = inputs.queues
        try:
            qdoc = yaml.safe_load(qtext)
        except yaml.YAMLError as e:
            raise InputError(qname, "", f"not YAML: {e}") from e
        if not isinstance(qdoc, dict) or not isinstance(qdoc.get("queues"), list):
            raise InputError(qname, "", "expected a queue file: {queues: [...]}, as for corral queue apply")
        doc["queues"] = qdoc["queues"]
    cluster_path = where / _plain(cluster_name, "cluster.yaml")
    cluster_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    world = load_cluster(cluster_path)
    trace_name, trace_bytes = inputs.trace
    trace_path = where / _plain(trace_name, "trace.csv")
    trace_path.write_bytes(trace_bytes)
    jobs = load_scenario(trace_path).jobs if trace_path.suffix in (".yaml", ".yml") else load_trace(trace_path)
    world.jobs = jobs[: inputs.limit]
    return world


def _plain(name: str, fallback: str) -> str:
    """A file name safe to write under the run's folder (an upload names itself)."""
    base = Path(name).name
    return base if base and all(c.isalnum() or c in "._-" for c in base) and not base.startswith(".") else fallback


def render(markdown: str, plots_url: str) -> str:
    """The report's markdown as HTML; raw HTML in it stays escaped (queue names come from uploaded files)."""
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    html: str = md.render(markdown)
    for level in range(5, 0, -1):  # the page has its own h1: the report's headings go one level down
        html = html.replace(f"<h{level}>", f"<h{level + 1}>").replace(f"</h{level}>", f"</h{level + 1}>")
    for name in PLOTS:
        html = html.replace(f'src="{name}"', f'src="{plots_url}{name}"')
    return html


def examples() -> dict[str, list[str]]:
    """Files under examples/ that can serve as each input: traces (CSV, or scenarios with jobs), clusters, queues."""
    out: dict[str, list[str]] = {"trace": [], "cluster": [], "queues": []}
    if not EXAMPLES.is_dir():
        return out
    for f in sorted(EXAMPLES.iterdir()):
        if f.suffix == ".csv":
            out["trace"].append(f.name)
        elif f.suffix in (".yaml", ".yml"):
            try:
                doc = yaml.safe_load(f.read_text())
            except (OSError, yaml.YAMLError):
                continue
            if not isinstance(doc, dict):
                continue
            if doc.get("jobs"):
                out["trace"].append(f.name)
            if "cluster" in doc:
                out["cluster"].append(f.name)
            elif "queues" in doc:
                out["queues"].append(f.name)
    return out


def example_bytes(kind: str, name: str) -> bytes:
    if name not in examples()[kind]:  # only the listed files: the name comes from the form
        raise InputError(name, "", f"no such example {kind} file")
    return (EXAMPLES / name).read_bytes()


def policies_of(chosen: list[str]) -> list[str]:
    return [p for p in POLICIES if p in chosen] or list(POLICIES)
