"""Corral vs Kueue + kube-scheduler, side by side on one API server: jobs admitted and pods bound per second.

One run of the test control plane (tests/k8s_kit.py: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler, kwok; Kubernetes v1.36.3) and up to three phases (--phases), in turn, each on a fresh, identical
set of N kwok nodes of G GPUs (64 CPUs, 512Gi each; one pool, Kueue flavor `h100`), with the same queue tree (two
departments of teams, one top-level team, quotas as fractions of the pool, summing to 80%) and the same J batch/v1
Jobs of one pod each (corral-api: J jobs of Corral's own), asking one GPU, 4 CPUs and 16Gi, spread round-robin
over the six teams (one namespace each):

- **corral**: Corral's service (Core on SQLite, its own scheduling loop `Core.run` as `corral serve` runs it, the
  Kubernetes executor). The Jobs' pod template has `schedulerName: corral`: kube-controller-manager makes each
  Job's pod, Corral takes it as a pod of others (its namespace labelled with the team's queue), decides and binds
  it with the Binding API. Corral admits a Job and binds its pod in one step (the decision is recorded when the
  bind has returned), so its admission time is its pod's bind time.
- **kueue**: Kueue v0.17.0's controller (tests/kueue_kit.py: its webhooks as URL webhooks, fair sharing on) with
  the tree exported by `scheduler.kueue.export` (cpu and memory covered, held by the root cohort). The Jobs are
  created suspended with `kueue.x-k8s.io/queue-name`; Kueue admits each Job's Workload (condition Admitted),
  unsuspends the Job, kube-controller-manager makes its pod and kube-scheduler binds it.
- **corral-api**: the same J one-GPU jobs (1 GPU, 4 CPUs, 16 GiB, the same teams round-robin, the same tree)
  submitted to Corral as its users submit them: JobSubmit(queue, pool, gpus, cpus, memory_gb, command) through the
  service's intake (Core.submit, what POST /v1/jobs calls; four threads in the service's process), the executor
  with k8s_workload "pod" as `corral serve` builds it: Corral creates each job's pod and binds it itself, so no
  batch/v1 Job and no kube-controller-manager is in the path. Admission = the engine's decision (the attempt's
  admitted_at in Corral's database, on the same wall clock); the watcher follows Corral's pods
  (app.kubernetes.io/managed-by=corral). The teams' namespaces (prefix `corral-api-`) are made beforehand, as in
  the other phases; Corral's team sync adopts them (and adds its ResourceQuota, NetworkPolicies, RoleBindings).

Every component's API client gets the same QPS and burst (--qps, --burst): kube-controller-manager
(--kube-api-qps/--kube-api-burst; its default of 20 would throttle the Job-to-pod path of both), kube-scheduler
(clientConnection), Kueue (Configuration clientConnection) and Corral (a token bucket in front of its Python
client, which has none of its own; the same bucket in both Corral phases). kwok (the kubelets) is unthrottled.
kwok's `pod-complete` stage is left out so Job pods stay Running: the J Jobs fill the pool (J = N x G by default)
and nothing waits.

All phases are timed alike, from the moment the benchmark starts creating the Jobs (four threads in a separate
process; corral-api: submitting the jobs; the scheduler already running and idle) to the last admission / the
last bind:

- **jobs admitted per second** = Jobs admitted / (time of the last admission - start of submission);
  Kueue: its Workload's Admitted condition turned True; Corral: its pod bound; corral-api: the engine admitted it.
- **pods bound per second** = pods bound (spec.nodeName set) / (time of the last bind - start of submission).

Times come from a watch in a separate process (the same observer in every phase, stamping each pod's first event
with spec.nodeName set and each Workload's first event with Admitted=True; also each pod's first event at all,
`pods_created`, to tell kube-controller-manager's share of the time from the scheduler's). At the end of each
phase the counts are verified against the API server (a list: pods with spec.nodeName on the phase's nodes,
Workloads admitted, Corral's running jobs). Between the phases the earlier phase's namespaces are deleted (and
waited for, up to 300 s) and its nodes removed. The 1-minute load average is sampled every 10 s (load_1m).

    python benchmarks/k8s_vs_kueue.py                              # 500 nodes x 8 GPUs, 4,000 Jobs, all phases
    python benchmarks/k8s_vs_kueue.py --phases corral-api,kueue    # some phases, in this order
    python benchmarks/k8s_vs_kueue.py --nodes 50 --jobs 400        # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PRODUCT = "NVIDIA-H100-80GB-HBM3"
POOL = PRODUCT  # Corral's pool is the nodes' nvidia.com/gpu.product label
FLAVOR = "h100"  # Kueue's ResourceFlavor for it
SET_LABEL = "corral.dev/bench-set"  # on nodes: which phase's node set
PHASE_LABEL = "corral.dev/bench-phase"  # on Jobs and their pods
GPU = "nvidia.com/gpu"
NODE_CPU, NODE_MEMORY_GI = 64, 512
JOB_RESOURCES = {GPU: "1", "cpu": "4", "memory": "16Gi"}
# (queue, parent, quota as a fraction of the pool): two departments, one top-level team; the root keeps 20%.
TREE = [
    ("research", None, 0.50),
    ("nlp", "research", 0.20),
    ("vision", "research", 0.15),
    ("speech", "research", 0.10),
    ("product", None, 0.30),
    ("ranking", "product", 0.15),
    ("ads", "product", 0.10),
    ("adhoc", None, 0.0),
]
TEAMS = [name for name, _, _ in TREE if name not in ("research", "product")]


def tree_document(capacity: int) -> dict[str, Any]:
    queues = []
    for name, parent, share in TREE:
        q: dict[str, Any] = {"name": name, "quota": {POOL: int(capacity * share)}}
        if parent:
            q["parent"] = parent
        queues.append(q)
    return {"queues": queues}


# --- the cluster ---------------------------------------------------------------------------------------------


def make_nodes(plane: Any, phase: str, n: int, gpus: int) -> list[str]:
    names = [f"{phase}-{i:04d}" for i in range(n)]
    with ThreadPoolExecutor(4) as pool:
        list(
            pool.map(
                lambda name: plane.create_gpu_node(
                    name,
                    product=PRODUCT,
                    gpus=gpus,
                    pool=POOL,
                    cpu=str(NODE_CPU),
                    memory=f"{NODE_MEMORY_GI}Gi",
                    labels={SET_LABEL: phase},
                ),
                names,
            )
        )
    core = plane.core()
    deadline = time.monotonic() + 600
    while True:
        nodes = json.loads(core.list_node(label_selector=f"{SET_LABEL}={phase}", _preload_content=False).data)
        ready = sum(
            any(c["type"] == "Ready" and c["status"] == "True" for c in nd["status"].get("conditions", []))
            for nd in nodes["items"]
        )
        if ready == n:
            return names
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {ready} of {n} nodes Ready")
        time.sleep(1)


def make_namespaces(plane: Any, phase: str, labels: dict[str, dict[str, str]]) -> dict[str, str]:
    core = plane.core()
    out = {}
    for team in TEAMS:
        ns = f"{phase}-{team}"
        core.create_namespace({"metadata": {"name": ns, "labels": {PHASE_LABEL: phase, **labels.get(team, {})}}})
        out[team] = ns
    deadline = time.monotonic() + 60
    for ns in out.values():
        while not core.list_namespaced_service_account(ns).items and time.monotonic() < deadline:
            time.sleep(0.2)
    return out


def clean_up(plane: Any, phase: str, namespaces: dict[str, str]) -> float:
    """Delete the phase's namespaces (kwok confirms its pods' deletions while their nodes exist), wait until they are
    gone, then delete its nodes. Returns the seconds it took."""
    t0 = time.perf_counter()
    core = plane.core()
    for ns in namespaces.values():
        with contextlib.suppress(Exception):
            core.delete_namespace(ns)
    deadline = time.monotonic() + 300
    while True:
        left = [
            n["metadata"]["name"]
            for n in json.loads(
                core.list_namespace(label_selector=f"{PHASE_LABEL}={phase}", _preload_content=False).data
            )["items"]
        ]
        if not left:
            break
        if time.monotonic() > deadline:
            print(f"warning: namespaces {left} not gone after 300 s; going on", file=sys.stderr)
            break
        time.sleep(2)
    core.delete_collection_node(label_selector=f"{SET_LABEL}={phase}")
    return time.perf_counter() - t0


def job_body(name: str, phase: str, team: str, kueue: bool) -> dict[str, Any]:
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": 0,
        "containers": [
            {"name": "main", "image": "busybox:1.36", "resources": {"requests": JOB_RESOURCES, "limits": JOB_RESOURCES}}
        ],
    }
    labels = {PHASE_LABEL: phase}
    spec: dict[str, Any] = {
        "parallelism": 1,
        "completions": 1,
        "backoffLimit": 0,
        "template": {"metadata": {"labels": labels}, "spec": pod},
    }
    if kueue:
        labels = {**labels, "kueue.x-k8s.io/queue-name": team}
        spec["suspend"] = True
    else:
        pod["schedulerName"] = "corral"
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "labels": labels}, "spec": spec}


# --- the submitter and the observer: separate processes, the same in both phases -------------------------------


def submit(kubeconfig: str, jobs: list[tuple[str, dict[str, Any]]], threads: int, out: Any) -> None:
    from kubernetes import client, config  # noqa: PLC0415

    api = config.new_client_from_config(config_file=kubeconfig)  # type: ignore[no-untyped-call]
    api.rest_client.pool_manager.connection_pool_kw["maxsize"] = threads
    batch = client.BatchV1Api(api)
    errors: list[str] = []

    def make(item: tuple[str, dict[str, Any]]) -> None:
        ns, body = item
        try:
            batch.create_namespaced_job(ns, body, _preload_content=False).read()
        except Exception as e:  # noqa: BLE001 (reported)
            errors.append(f"{ns}/{body['metadata']['name']}: {e}")

    t0 = time.time()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(make, jobs))
    out.put({"t0": t0, "t_end": time.time(), "errors": errors[:5], "failed": len(errors)})


def _lines(resp: Any) -> Any:
    buf = b""
    for chunk in resp.stream(65536, decode_content=False):
        buf += chunk
        *whole, buf = buf.split(b"\n")
        yield from (w for w in whole if w.strip())


def observe(
    kubeconfig: str,
    phase: str,
    want: int,
    workloads: bool,
    ready: Any,
    done: Any,
    out: Any,
    timeout: float,
    selector: str | None = None,
) -> None:
    """Stamp each pod's first bind and each Workload's admission (wall clock), until `want` of each or timeout.
    Pods: those labelled with the phase, or matching `selector`."""
    from kubernetes import client, config  # noqa: PLC0415

    api = config.new_client_from_config(config_file=kubeconfig)  # type: ignore[no-untyped-call]
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    bound: dict[str, float] = {}
    admitted: dict[str, float] = {}
    created: dict[str, float] = {}  # each pod's first event: when kube-controller-manager made it
    lock = threading.Lock()
    deadline = time.time() + timeout
    started = threading.Barrier(3 if workloads else 2)

    def finished() -> bool:
        return len(bound) >= want and (not workloads or len(admitted) >= want)

    def watch(kind: str) -> None:
        def call(**kw: Any) -> Any:
            if kind == "pods":
                return core.list_pod_for_all_namespaces(
                    label_selector=selector or f"{PHASE_LABEL}={phase}", _preload_content=False, **kw
                )
            return custom.list_cluster_custom_object(
                "kueue.x-k8s.io", "v1beta2", "workloads", _preload_content=False, **kw
            )

        rv = json.loads(call().data)["metadata"]["resourceVersion"]
        first = True
        while time.time() < deadline and not done.is_set():
            resp = call(watch=True, resource_version=rv, timeout_seconds=30, allow_watch_bookmarks=True)
            if first:
                started.wait()
                first = False
            for line in _lines(resp):
                ev = json.loads(line)
                obj = ev["object"]
                rv = obj["metadata"].get("resourceVersion", rv)
                if ev["type"] not in ("ADDED", "MODIFIED"):
                    continue
                now = time.time()
                uid = obj["metadata"]["uid"]
                with lock:
                    if kind == "pods":
                        created.setdefault(uid, now)
                        if obj["spec"].get("nodeName") and uid not in bound:
                            bound[uid] = now
                    elif (
                        obj["metadata"]["namespace"].startswith(f"{phase}-")
                        and uid not in admitted
                        and any(
                            c["type"] == "Admitted" and c["status"] == "True"
                            for c in (obj.get("status") or {}).get("conditions", [])
                        )
                    ):
                        admitted[uid] = now
                    if finished():
                        done.set()
                if done.is_set():
                    break
            resp.release_conn()

    threads = [threading.Thread(target=watch, args=("pods",), daemon=True)]
    if workloads:
        threads.append(threading.Thread(target=watch, args=("workloads",), daemon=True))
    for t in threads:
        t.start()
    started.wait()
    ready.set()
    while not done.is_set() and time.time() < deadline:
        done.wait(1)
    with lock:
        out.put(
            {
                "bound": sorted(bound.values()),
                "admitted": sorted(admitted.values()),
                "created": sorted(created.values()),
            }
        )


# --- Corral's client: the same QPS and burst as the Go components' client-go token buckets ----------------------


class TokenBucket:
    def __init__(self, qps: float, burst: int):
        self.qps, self.burst, self.tokens, self.t = qps, float(burst), float(burst), time.monotonic()
        self.lock = threading.Lock()

    def take(self) -> None:
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.t) * self.qps)
            self.t = now
            self.tokens -= 1
            wait = -self.tokens / self.qps if self.tokens < 0 else 0.0
        if wait > 0:
            time.sleep(wait)


def throttled_client(kubeconfig: Path, qps: float, burst: int) -> Any:
    from kubernetes import config  # noqa: PLC0415

    api = config.new_client_from_config(config_file=str(kubeconfig))  # type: ignore[no-untyped-call]
    bucket, request = TokenBucket(qps, burst), api.rest_client.request

    def limited(*a: Any, **kw: Any) -> Any:
        bucket.take()
        return request(*a, **kw)

    api.rest_client.request = limited  # every call (and each watch request) goes through it
    return api


@contextlib.contextmanager
def profiled(directory: str | None, phase: str) -> Iterator[None]:
    """With --profile DIR: py-spy samples this process (the threads holding the GIL: Corral's CPU) while the block
    runs, into DIR/<phase>.txt (collapsed stacks, one line per stack with its sample count)."""
    if not directory:
        yield
        return
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out = Path(directory) / f"{phase}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    rec = subprocess.Popen(
        [
            spy,
            "record",
            "--pid",
            str(os.getpid()),
            "--gil",
            "--rate",
            "50",
            "--nonblocking",
            "--format",
            "raw",
            "--output",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        rec.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            rec.wait(120)


def cache_counts(ex: Any) -> dict[str, int]:
    """The executor's cache of bound pods: LISTs made, watch events applied, attempts read afresh."""
    return {"lists": ex.bound.lists, "events": ex.bound.events, "fresh_reads": ex.bound.fresh_reads}


# --- the phases --------------------------------------------------------------------------------------------------


def timed(
    plane: Any,
    phase: str,
    jobs: list[tuple[str, dict[str, Any]]],
    want: int,
    workloads: bool,
    timeout: float,
    submitter: Callable[[], dict[str, Any]] | None = None,
    selector: str | None = None,
    admissions: Callable[[], list[float]] | None = None,
) -> dict[str, Any]:
    """Start the observer, then the submitter; wait until `want` pods are bound (and Workloads admitted).
    `submitter` (in this process) instead of the Job-creating process; `admissions`: the admission times, read once
    the pods are bound, instead of the binds (Corral's phase) or the Workloads (Kueue's)."""
    ctx = mp.get_context("spawn")
    ready, done, q_obs, q_sub = ctx.Event(), ctx.Event(), ctx.Queue(), ctx.Queue()
    obs = ctx.Process(
        target=observe, args=(str(plane.kubeconfig), phase, want, workloads, ready, done, q_obs, timeout, selector)
    )
    obs.start()
    if not ready.wait(120):
        raise TimeoutError("the observer did not start")
    if submitter is not None:
        submitted = submitter()
    else:
        sub = ctx.Process(target=submit, args=(str(plane.kubeconfig), jobs, 4, q_sub))
        sub.start()
        submitted = q_sub.get(timeout=timeout)
        sub.join()
    seen = q_obs.get(timeout=timeout + 60)
    obs.join()
    t0 = submitted["t0"]
    bound, admitted = seen["bound"], seen["admitted"] if workloads else seen["bound"]
    if admissions is not None:
        admitted = sorted(admissions())

    def rate(times: list[float]) -> dict[str, Any]:
        if not times:
            return {"count": 0}
        span = times[-1] - t0
        return {
            "count": len(times),
            "last_s": round(span, 2),
            "per_s": round(len(times) / span, 1),
            "p50_s": round(times[len(times) // 2] - t0, 2),
            "first_s": round(times[0] - t0, 2),
        }

    return {
        "submit_s": round(submitted["t_end"] - t0, 2),
        "submit_failed": submitted["failed"],
        "submit_errors": submitted["errors"],
        "admitted": rate(admitted),
        "bound": rate(bound),
        "pods_created": rate(seen["created"]),
    }


def verify(plane: Any, phase: str, nodes: list[str], namespaces: dict[str, str]) -> dict[str, int]:
    core = plane.core()
    pods = json.loads(
        core.list_pod_for_all_namespaces(label_selector=f"{PHASE_LABEL}={phase}", _preload_content=False).data
    )["items"]
    ours = set(nodes)
    return {
        "pods": len(pods),
        "bound_on_phase_nodes": sum(p["spec"].get("nodeName") in ours for p in pods),
        "bound_elsewhere": sum(bool(p["spec"].get("nodeName")) and p["spec"]["nodeName"] not in ours for p in pods),
    }


def phase_corral(plane: Any, args: argparse.Namespace, work: Path, last: bool) -> dict[str, Any]:
    import sqlalchemy as sa  # noqa: PLC0415

    from scheduler.backends.kubernetes import objects as k8s  # noqa: PLC0415
    from scheduler.backends.kubernetes.executor import KubernetesExecutor  # noqa: PLC0415
    from scheduler.service.api.auth import Principal, Role  # noqa: PLC0415
    from scheduler.service.core.assemble import build_core  # noqa: PLC0415
    from scheduler.service.core.settings import ServiceSettings  # noqa: PLC0415
    from scheduler.service.store.db import jobs as jobs_table  # noqa: PLC0415

    phase = "corral"
    t0 = time.perf_counter()
    nodes = make_nodes(plane, phase, args.nodes, args.gpus)
    namespaces = make_namespaces(plane, phase, {t: {k8s.QUEUE_LABEL: t} for t in TEAMS})
    capacity = args.nodes * args.gpus
    api = throttled_client(plane.kubeconfig, args.qps, args.burst)
    # As `corral serve` builds it (scheduler/service/core/assemble.py), unless --corral-watch-s is given.
    extra = {} if args.corral_watch_s is None else {"watch_s": args.corral_watch_s}
    ex = KubernetesExecutor(
        api,
        work / "corral-k8s",
        "busybox:1.36",
        grace_s=0,
        namespace_prefix="benchc-",
        node_selector=f"{SET_LABEL}={phase}",
        **extra,
    )
    stop = threading.Event()
    loop = None
    try:
        c = build_core(ServiceSettings(data_dir=work / "corral"), executor=ex, nodes=ex.discover())
        c.apply_queues(Principal("root", Role.PLATFORM_ADMIN), tree_document(capacity))
        loop = threading.Thread(target=c.run, args=(stop,), daemon=True)
        loop.start()
        setup_s = time.perf_counter() - t0
        jobs = [
            (namespaces[TEAMS[i % len(TEAMS)]], job_body(f"j-{i:05d}", phase, TEAMS[i % len(TEAMS)], False))
            for i in range(args.jobs)
        ]
        with profiled(args.profile, phase):
            out = timed(plane, phase, jobs, min(args.jobs, capacity), False, args.timeout)
        time.sleep(1)
        with c.db.connect() as conn:
            running = int(
                conn.execute(
                    sa.select(sa.func.count()).select_from(jobs_table).where(jobs_table.c.state == "running")
                ).scalar_one()
            )
        out["verified"] = {**verify(plane, phase, nodes, namespaces), "corral_running": running}
        out["cache"] = cache_counts(ex)
    finally:
        stop.set()
        if loop is not None:
            loop.join(30)
        ex.close()
    out["setup_s"] = round(setup_s, 1)
    print(json.dumps({phase: out}), file=sys.stderr, flush=True)
    if not last:
        out["cleanup_s"] = round(clean_up(plane, phase, namespaces), 1)
    return out


def phase_corral_api(plane: Any, args: argparse.Namespace, work: Path, last: bool) -> dict[str, Any]:
    """Corral's own jobs: submitted to the service's intake (Core.submit, as the API's POST /v1/jobs does) and run
    with k8s_workload "pod": Corral creates each job's pod and binds it itself, no Job controller in the path."""
    import sqlalchemy as sa  # noqa: PLC0415

    from scheduler.backends.kubernetes import objects as k8s  # noqa: PLC0415
    from scheduler.backends.kubernetes.executor import KubernetesExecutor  # noqa: PLC0415
    from scheduler.service.api.auth import Principal, Role  # noqa: PLC0415
    from scheduler.service.core.assemble import build_core  # noqa: PLC0415
    from scheduler.service.core.settings import ServiceSettings  # noqa: PLC0415
    from scheduler.service.core.specs import JobSubmit  # noqa: PLC0415
    from scheduler.service.store.db import attempts as attempts_table  # noqa: PLC0415
    from scheduler.service.store.db import jobs as jobs_table  # noqa: PLC0415

    phase = "corral-api"
    t0 = time.perf_counter()
    nodes = make_nodes(plane, phase, args.nodes, args.gpus)
    # The teams' namespaces as Corral names them (prefix + queue), made beforehand as in the other phases (and
    # labelled with the phase for the clean-up); Corral's team sync adopts them (a patch: the label stays).
    namespaces = make_namespaces(plane, phase, {})
    capacity = args.nodes * args.gpus
    api = throttled_client(plane.kubeconfig, args.qps, args.burst)
    extra = {} if args.corral_watch_s is None else {"watch_s": args.corral_watch_s}
    ex = KubernetesExecutor(
        api,
        work / "corral-api-k8s",
        "busybox:1.36",
        grace_s=0,
        namespace_prefix=f"{phase}-",
        node_selector=f"{SET_LABEL}={phase}",
        workload="pod",
        **extra,
    )
    stop = threading.Event()
    loop = None
    root = Principal("root", Role.PLATFORM_ADMIN)
    try:
        c = build_core(ServiceSettings(data_dir=work / "corral-api"), executor=ex, nodes=ex.discover())
        c.apply_queues(root, tree_document(capacity))
        loop = threading.Thread(target=c.run, args=(stop,), daemon=True)
        loop.start()
        setup_s = time.perf_counter() - t0
        subs = [
            JobSubmit(
                name=f"j-{i:05d}",
                queue=TEAMS[i % len(TEAMS)],
                pool=POOL,
                gpus=1,
                cpus=4,
                memory_gb=16,
                command="sleep inf",
            )
            for i in range(args.jobs)
        ]

        def submitter() -> dict[str, Any]:
            errors: list[str] = []

            def one(sub: Any) -> None:
                try:
                    c.submit(root, sub)
                except Exception as e:  # noqa: BLE001 (reported)
                    errors.append(f"{sub.name}: {e}")

            start = time.time()
            with ThreadPoolExecutor(4) as pool:  # four submitters, as the Job-creating process has
                list(pool.map(one, subs))
            return {"t0": start, "t_end": time.time(), "errors": errors[:5], "failed": len(errors)}

        def times(column: Any) -> list[float]:
            with c.db.connect() as conn:
                return [float(t) for t in conn.execute(sa.select(column).where(column.is_not(None))).scalars()]

        with profiled(args.profile, phase):
            out = timed(
                plane,
                phase,
                [],
                min(args.jobs, capacity),
                False,
                args.timeout,
                submitter=submitter,
                selector=f"{k8s.MANAGED_BY}=corral,{k8s.KIND_LABEL}=job",
                admissions=lambda: times(attempts_table.c.admitted_at),
            )
        time.sleep(1)
        with c.db.connect() as conn:
            running = int(
                conn.execute(
                    sa.select(sa.func.count()).select_from(jobs_table).where(jobs_table.c.state == "running")
                ).scalar_one()
            )
        core = plane.core()
        pods = json.loads(
            core.list_pod_for_all_namespaces(label_selector=f"{k8s.MANAGED_BY}=corral", _preload_content=False).data
        )["items"]
        ours = set(nodes)
        out["verified"] = {
            "pods": len(pods),
            "bound_on_phase_nodes": sum(p["spec"].get("nodeName") in ours for p in pods),
            "bound_elsewhere": sum(bool(p["spec"].get("nodeName")) and p["spec"]["nodeName"] not in ours for p in pods),
            "corral_running": running,
        }
        out["cache"] = cache_counts(ex)
    finally:
        stop.set()
        if loop is not None:
            loop.join(30)
        ex.close()
    out["setup_s"] = round(setup_s, 1)
    print(json.dumps({phase: out}), file=sys.stderr, flush=True)
    if not last:
        out["cleanup_s"] = round(clean_up(plane, phase, namespaces), 1)
    return out


def phase_kueue(plane: Any, args: argparse.Namespace, work: Path, kueue_bin: Path, last: bool) -> dict[str, Any]:
    from scheduler.kueue import export_objects  # noqa: PLC0415
    from scheduler.kueue.client import KueueClient  # noqa: PLC0415
    from scheduler.service.core.queues import build_tree  # noqa: PLC0415
    from tests.kueue_kit import KueueController, condition  # noqa: PLC0415

    phase = "kueue"
    t0 = time.perf_counter()
    nodes = make_nodes(plane, phase, args.nodes, args.gpus)
    namespaces = make_namespaces(plane, phase, {})
    capacity = args.nodes * args.gpus
    controller = KueueController(plane, kueue_bin, qps=args.qps, burst=args.burst)
    try:
        controller.start()
        tree = build_tree(tree_document(capacity), {POOL: capacity})
        objects = export_objects(
            tree,
            {POOL: FLAVOR},
            lambda q: namespaces[q.name],
            products={POOL: PRODUCT},
            pool_resources={POOL: {"cpu": args.nodes * NODE_CPU, "memory": f"{args.nodes * NODE_MEMORY_GI}Gi"}},
        )
        KueueClient(plane.api_client()).apply_all(objects)
        from kubernetes import client  # noqa: PLC0415

        custom = client.CustomObjectsApi(plane.api_client())
        deadline = time.monotonic() + 120
        while not all(
            (
                condition(custom.get_cluster_custom_object("kueue.x-k8s.io", "v1beta2", "clusterqueues", t), "Active")
                or {}
            ).get("status")
            == "True"
            for t in TEAMS
        ):
            if time.monotonic() > deadline:
                raise TimeoutError(f"ClusterQueues not Active\n{controller.tail()}")
            time.sleep(0.5)
        setup_s = time.perf_counter() - t0
        jobs = [
            (namespaces[TEAMS[i % len(TEAMS)]], job_body(f"j-{i:05d}", phase, TEAMS[i % len(TEAMS)], True))
            for i in range(args.jobs)
        ]
        out = timed(plane, phase, jobs, min(args.jobs, capacity), True, args.timeout)
        time.sleep(1)
        admitted = 0
        for ns in namespaces.values():
            for w in custom.list_namespaced_custom_object("kueue.x-k8s.io", "v1beta2", ns, "workloads")["items"]:
                admitted += (condition(w, "Admitted") or {}).get("status") == "True"
        out["verified"] = {**verify(plane, phase, nodes, namespaces), "workloads_admitted": admitted}
        out["setup_s"] = round(setup_s, 1)
        print(json.dumps({phase: out}), file=sys.stderr, flush=True)
        if not last:  # with Kueue still running: it removes its finalizers from the Workloads of the deleted Jobs
            out["cleanup_s"] = round(clean_up(plane, phase, namespaces), 1)
        shutil.copy(controller.workdir / "kueue.log", work / "kueue.log")
    finally:
        controller.stop()
    return out


PHASES = ("corral", "corral-api", "kueue")  # Kueue last: its clean-up (Kueue running) is the slowest


def sample_load(samples: list[tuple[float, float]], stop: threading.Event) -> None:
    """The 1-minute load average every 10 s (the machine is shared: the rates are read against it)."""
    while not stop.is_set():
        samples.append((time.time(), os.getloadavg()[0]))
        stop.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=500)
    ap.add_argument("--gpus", type=int, default=8, help="GPUs per node")
    ap.add_argument("--jobs", type=int, help="one-GPU Jobs per phase (default: nodes x GPUs, all fit)")
    ap.add_argument("--qps", type=float, default=500, help="client QPS of every component")
    ap.add_argument("--burst", type=int, default=1000, help="client burst of every component")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per phase")
    ap.add_argument(
        "--phases",
        default=",".join(PHASES),
        help=f"the phases to run, in this order, comma-separated (default {','.join(PHASES)})",
    )
    ap.add_argument("--only", choices=PHASES, help="one phase only (the same as --phases PHASE)")
    ap.add_argument(
        "--corral-watch-s",
        type=int,
        help="the Kubernetes executor's watch_s (default: its own, as `corral serve` runs it)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    ap.add_argument(
        "--profile",
        metavar="DIR",
        help="py-spy samples Corral's process during each Corral phase "
        "(the threads holding the GIL) into DIR/<phase>.txt, collapsed stacks",
    )
    args = ap.parse_args()
    args.jobs = args.jobs or args.nodes * args.gpus
    phases = [args.only] if args.only else [p.strip() for p in args.phases.split(",") if p.strip()]
    if not phases or any(p not in PHASES for p in phases) or len(set(phases)) != len(phases):
        sys.exit(f"--phases: distinct names among {', '.join(PHASES)}")

    from tests.k8s_kit import ControlPlane, find_bin_dir  # noqa: PLC0415
    from tests.kueue_kit import find_kueue  # noqa: PLC0415

    bin_dir, why = find_bin_dir()
    if bin_dir is None:
        sys.exit(f"no Kubernetes tools: {why} (run scripts/k8s-tools)")
    kueue_bin, why = find_kueue()
    if kueue_bin is None and "kueue" in phases:
        sys.exit(f"no Kueue: {why} (run scripts/kueue)")
    work = Path(tempfile.mkdtemp(prefix="corral-vs-kueue-"))
    (work / "plane").mkdir()
    plane = ControlPlane(
        bin_dir, work / "plane", client_qps=args.qps, client_burst=args.burst, kwok_skip_stages=("pod-complete",)
    )
    out: dict[str, Any] = {
        "nodes": args.nodes,
        "gpus_per_node": args.gpus,
        "jobs": args.jobs,
        "qps": args.qps,
        "burst": args.burst,
        "corral_watch_s": args.corral_watch_s,
        "phases": phases,
        "work": str(work),
    }
    loads: list[tuple[float, float]] = []
    stop_load = threading.Event()
    threading.Thread(target=sample_load, args=(loads, stop_load), daemon=True).start()
    try:
        t0 = time.perf_counter()
        plane.start()
        out["plane_s"] = round(time.perf_counter() - t0, 1)
        for i, phase in enumerate(phases):
            last = i == len(phases) - 1
            since = time.time()
            if phase == "corral":
                out[phase] = phase_corral(plane, args, work, last=last)
            elif phase == "corral-api":
                out[phase] = phase_corral_api(plane, args, work, last=last)
            else:
                assert kueue_bin is not None
                out[phase] = phase_kueue(plane, args, work, kueue_bin, last=last)
            during = [load for t, load in loads if t >= since]
            if during:
                out[phase]["load_1m"] = {"min": min(during), "max": max(during), "samples": len(during)}
            if not last:
                print(json.dumps(out), flush=True)
        for mine in ("corral", "corral-api"):
            if mine in out and "kueue" in out:
                for what in ("admitted", "bound"):
                    c, k = out[mine][what].get("per_s"), out["kueue"][what].get("per_s")
                    if c and k:
                        out[f"{mine.replace('-', '_')}_over_kueue_{what}"] = round(c / k, 2)
        print(json.dumps(out), flush=True)
    finally:
        stop_load.set()
        plane.stop()
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
