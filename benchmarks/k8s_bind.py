"""Pods bound per second by Corral, end to end through a real API server, on kwok GPU nodes.

The control plane of the Kubernetes tests (tests/k8s_kit.py: etcd, kube-apiserver, controller manager,
kube-scheduler, kwok) with N kwok nodes of G GPUs each. Two runs, each on an empty cluster and a fresh service:

- corral: P one-GPU jobs submitted to the service (Core, SQLite); timed from the first scheduling cycle until every
  job that fits is running, i.e. its pod created and bound with the Binding API (launch returned).
- foreign: P one-GPU pods created by someone else with schedulerName corral (each a gang of one, in a namespace
  labelled with the queue); timed from the service's start (its first list of pending pods) until every pod that
  fits is bound.

Only N x G pods fit at once; the rest wait, as they would on a real cluster. The count of bound pods is checked
against the API server (spec.nodeName set) at the end.

    python benchmarks/k8s_bind.py                       # 500 nodes x 8 GPUs, 5,000 pods
    python benchmarks/k8s_bind.py --nodes 20 --pods 200 # a quick look
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scheduler.backends.base import CLUSTER_OWNER  # noqa: E402
from scheduler.backends.kubernetes import objects as k8s  # noqa: E402  (run as a script from anywhere)
from scheduler.backends.kubernetes.executor import KubernetesExecutor  # noqa: E402
from scheduler.service.api.auth import Principal, Role  # noqa: E402
from scheduler.service.core.assemble import build_core  # noqa: E402
from scheduler.service.core.loop import Core  # noqa: E402
from scheduler.service.core.settings import ServiceSettings  # noqa: E402
from scheduler.service.core.specs import JobSubmit  # noqa: E402
from scheduler.service.store.db import jobs  # noqa: E402
from tests.k8s_kit import ControlPlane, find_bin_dir  # noqa: E402

LABEL = "corral.dev/bench"
ROOT_USER = Principal("root", Role.PLATFORM_ADMIN)


def make_nodes(plane: ControlPlane, n: int, gpus: int) -> None:
    with ThreadPoolExecutor(4) as pool:
        list(
            pool.map(
                lambda i: plane.create_gpu_node(
                    f"bench-{i:04d}", product="NVIDIA-H100-80GB-HBM3", gpus=gpus, labels={LABEL: "1"}
                ),
                range(n),
            )
        )
    core = plane.core()
    deadline = time.monotonic() + 600
    while True:
        ready = sum(
            any(c.type == "Ready" and c.status == "True" for c in (nd.status.conditions or []))
            for nd in core.list_node(label_selector=f"{LABEL}=1").items
        )
        if ready == n:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {ready} of {n} nodes Ready")
        time.sleep(1)


def running(c: Core, owner: str | None = None) -> int:
    q = sa.select(sa.func.count()).select_from(jobs).where(jobs.c.state == "running")
    if owner is not None:
        q = q.where(jobs.c.owner == owner)
    with c.db.connect() as conn:
        return int(conn.execute(q).scalar_one())


def bound_pods(plane: ControlPlane, ns: str) -> int:
    pods = plane.core().list_namespaced_pod(ns, _preload_content=False)
    return sum(1 for p in json.loads(pods.data)["items"] if p["spec"].get("nodeName"))


def cycle_until(c: Core, want: int, owner: str | None, timeout_s: float) -> tuple[float, int]:
    t0, cycles = time.perf_counter(), 0
    while running(c, owner) < want:
        c.tick()
        cycles += 1
        if time.perf_counter() - t0 > timeout_s:
            raise TimeoutError(f"{running(c, owner)} of {want} running after {timeout_s} s")
    return time.perf_counter() - t0, cycles


def executor(plane: ControlPlane, work: Path, prefix: str) -> KubernetesExecutor:
    return KubernetesExecutor(
        plane.api_client(), work / "k8s", "busybox:1.36", grace_s=0, namespace_prefix=prefix, node_selector=f"{LABEL}=1"
    )


def run_corral(plane: ControlPlane, work: Path, pods: int, fits: int, timeout_s: float) -> dict[str, Any]:
    ex = executor(plane, work, "bench-")
    try:
        c = build_core(ServiceSettings(data_dir=work / "corral"), executor=ex, nodes=ex.discover())
        t0 = time.perf_counter()
        for _ in range(pods):
            c.submit(ROOT_USER, JobSubmit(queue="default", gpus=1, command="sleep inf"))
        submit_s = time.perf_counter() - t0
        seconds, cycles = cycle_until(c, fits, None, timeout_s)
        bound = bound_pods(plane, "bench-default")
    finally:
        ex.close()
    return {
        "submitted": pods,
        "submit_s": round(submit_s, 2),
        "bound": bound,
        "seconds": round(seconds, 2),
        "pods_per_s": round(fits / seconds, 1),
        "cycles": cycles,
    }


def run_foreign(plane: ControlPlane, work: Path, pods: int, fits: int, timeout_s: float) -> dict[str, Any]:
    api, ns = plane.core(), "bench-foreign"
    api.create_namespace({"metadata": {"name": ns, "labels": {k8s.QUEUE_LABEL: "default"}}})
    deadline = time.monotonic() + 60
    while not api.list_namespaced_service_account(ns).items and time.monotonic() < deadline:
        time.sleep(0.2)

    def make(i: int) -> None:
        api.create_namespaced_pod(
            ns,
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": f"p-{i:05d}"},
                "spec": {
                    "schedulerName": "corral",
                    "restartPolicy": "Never",
                    "terminationGracePeriodSeconds": 0,
                    "containers": [{"name": "main", "image": "busybox:1.36", "resources": {"limits": {k8s.GPU: "1"}}}],
                },
            },
        )

    t0 = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(make, range(pods)))
    create_s = time.perf_counter() - t0
    ex = executor(plane, work, "benchf-")
    try:
        t0 = time.perf_counter()
        c = build_core(ServiceSettings(data_dir=work / "foreign"), executor=ex, nodes=ex.discover())
        seconds, cycles = cycle_until(c, fits, CLUSTER_OWNER, timeout_s)
        total = time.perf_counter() - t0
        bound = bound_pods(plane, ns)
    finally:
        ex.close()
    return {
        "created": pods,
        "create_s": round(create_s, 2),
        "bound": bound,
        "seconds": round(total, 2),
        "pods_per_s": round(fits / total, 1),
        "cycles": cycles,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=500)
    ap.add_argument("--gpus", type=int, default=8, help="GPUs per node")
    ap.add_argument("--pods", type=int, default=5000, help="one-GPU pods per run")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    ap.add_argument("--only", choices=["corral", "foreign"], help="one run only")
    args = ap.parse_args()
    bin_dir, why = find_bin_dir()
    if bin_dir is None:
        sys.exit(f"no Kubernetes tools: {why} (run scripts/k8s-tools)")
    work = Path(tempfile.mkdtemp(prefix="corral-k8s-bench-"))
    plane = ControlPlane(bin_dir, work / "plane")
    (work / "plane").mkdir()
    fits = min(args.pods, args.nodes * args.gpus)
    out: dict[str, Any] = {"nodes": args.nodes, "gpus_per_node": args.gpus, "pods": args.pods, "fit": fits}
    try:
        t0 = time.perf_counter()
        plane.start()
        make_nodes(plane, args.nodes, args.gpus)
        out["setup_s"] = round(time.perf_counter() - t0, 1)
        if args.only in (None, "corral"):
            out["corral"] = run_corral(plane, work, args.pods, fits, args.timeout)
            print(json.dumps(out), flush=True)
            plane.core().delete_collection_namespaced_pod("bench-default", grace_period_seconds=0)
            time.sleep(2)
        if args.only in (None, "foreign"):
            out["foreign"] = run_foreign(plane, work, args.pods, fits, args.timeout)
        print(json.dumps(out), flush=True)
    finally:
        plane.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
