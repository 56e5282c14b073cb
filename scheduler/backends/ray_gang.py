"""The entrypoint of a gang on Ray: reserve one placement-group bundle per worker, then run every worker at once.

Run by the Ray Jobs API as `python ray_gang.py <spec>` (the spec is base64 JSON written by RayExecutor). It is the
job's driver: it reserves a placement group with one bundle per worker, each bundle pinned by label to the node
Corral chose, and waits (bounded) until the whole group is placed, so a gang starts whole or not at all. Each
worker is a Ray task in its bundle that runs the job's command as a subprocess, with CUDA_VISIBLE_DEVICES as Ray
assigns it to that task and RANK / WORLD_SIZE / MASTER_ADDR set. The first worker to fail fails the job: the
others are cancelled. The driver's exit code is the job's: 0, the failed worker's code, or UNPLACED.

This file imports only the standard library and Ray: RayExecutor uploads it alone as the job's working_dir, so
the Ray cluster needs no Corral installed.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

UNPLACED = 75  # EX_TEMPFAIL: the placement group was not ready in time; nothing ran
NODE_LABEL = "ray.io/node-id"  # a label Ray gives every node: pins a bundle to one node
LOG_FLUSH_S = 1.5  # Ray forwards workers' output to the driver asynchronously; let the last lines arrive
WAIT_S = 0.5  # the longest the driver's loop waits on Ray before it looks at signals again
GRACE_ENV = "CORRAL_GRACE_S"  # seconds between a worker command's SIGTERM and its SIGKILL (the service's grace_s)
PR_SET_PDEATHSIG = 1


def encode(spec: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(spec).encode()).decode()


def decode(text: str) -> dict[str, Any]:
    spec: dict[str, Any] = json.loads(base64.urlsafe_b64decode(text.encode()))
    return spec


def run_worker(argv: list[str], env: dict[str, str], cwd: str | None) -> int:
    """One worker: the command as a child of this Ray task; its exit code (negative: killed by that signal)."""
    full = {**os.environ, **env}  # os.environ carries the CUDA_VISIBLE_DEVICES Ray gave this task
    libc = ctypes.CDLL(None, use_errno=True)  # loaded here: between fork and exec (a threaded parent) only call it

    def die_with_parent() -> None:
        # If the Ray worker dies (stop_job's SIGKILL of the driver, a forced cancel), the command goes with it
        # instead of holding GPUs on the node.
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)

    proc = subprocess.Popen(argv, env=full, cwd=cwd, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
    try:
        while True:
            # Bounded waits: ray.cancel raises KeyboardInterrupt asynchronously, which Python sees only while it
            # runs bytecode, never inside one long waitpid (a rank waiting so never got its SIGTERM).
            with contextlib.suppress(subprocess.TimeoutExpired):
                return proc.wait(timeout=WAIT_S)
    except KeyboardInterrupt:  # ray.cancel: the gang is stopping; SIGTERM, then the whole grace to checkpoint
        print("corral: SIGTERM to this rank's command", file=sys.stderr, flush=True)
        proc.terminate()
        try:
            proc.wait(timeout=float(env.get(GRACE_ENV, "30")))
        except subprocess.TimeoutExpired:
            proc.kill()
        raise


def main(args: list[str]) -> int:
    spec = decode(args[0])
    workers: list[dict[str, Any]] = spec["workers"]
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # workers' lines reach the job log without colour codes
    ray.init()  # inside a Ray job: joins the cluster running it (token and address come from its environment)
    # A bundle must ask for something: a GPU-less worker asks for a sliver of CPU.
    bundles = [{"GPU": float(w["gpus"])} if w["gpus"] else {"CPU": 0.001} for w in workers]
    pg = placement_group(
        bundles, strategy=spec["strategy"], bundle_label_selector=[{NODE_LABEL: w["node"]} for w in workers]
    )
    ready, _ = ray.wait([pg.ready()], timeout=spec["ready_timeout_s"])
    if not ready:
        print(
            f"corral: the gang's placement group was not ready after {spec['ready_timeout_s']} s; nothing ran",
            file=sys.stderr,
            flush=True,
        )
        remove_placement_group(pg)
        return UNPLACED
    task = ray.remote(run_worker)
    refs = []
    for rank, w in enumerate(workers):
        env = {
            **spec["env"],
            "RANK": str(rank),
            "LOCAL_RANK": "0",
            "WORLD_SIZE": str(len(workers)),
            "MASTER_ADDR": spec.get("master_addr") or "127.0.0.1",
            "MASTER_PORT": spec["env"].get("MASTER_PORT", "29500"),
        }
        strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank)
        opts: dict[str, Any] = {
            "num_gpus": w["gpus"],
            "num_cpus": 0 if w["gpus"] else 0.001,
            "scheduling_strategy": strategy,
            "max_retries": 0,
        }
        refs.append(task.options(**opts).remote(spec["argv"], env, spec.get("cwd")))

    stopped: list[int] = []  # the signal stop_job sent; the handler only notes it (Ray's wait must not be
    # interrupted by an exception: it answers SystemError), and the loop below acts on it

    signal.signal(signal.SIGTERM, lambda signum, _frame: stopped.append(signum))
    code = 0
    pending = list(refs)
    while pending and code == 0 and not stopped:
        # Bounded waits: Python runs the SIGTERM handler only between them, never inside Ray's blocking wait.
        done, pending = ray.wait(pending, num_returns=1, timeout=WAIT_S)
        if not done:
            continue
        try:
            code = int(ray.get(done[0]))
        except ray.exceptions.RayError as e:  # the worker itself died (node lost, OOM-killed)
            print(f"corral: a worker died: {e}", file=sys.stderr, flush=True)
            code = 1
    if stopped:
        # Every rank's command gets SIGTERM, and the driver waits out their grace (Ray's SIGKILL of the driver
        # comes later: RayExecutor sets RAY_JOB_STOP_WAIT_TIME_S above the grace), so each rank can save its
        # checkpoint; then it ends like a terminated process.
        print(f"corral: stopping the gang (signal {stopped[0]}): SIGTERM to every rank", file=sys.stderr, flush=True)
        for ref in refs:
            ray.cancel(ref)
        ray.wait(refs, num_returns=len(refs), timeout=float(spec["env"].get(GRACE_ENV, "30")) + 1)
        time.sleep(LOG_FLUSH_S)
        return 128 + stopped[0]
    for ref in pending:  # one failed: the gang fails whole
        ray.cancel(ref)
    time.sleep(LOG_FLUSH_S)
    return code if code >= 0 else 128 - code  # a worker killed by signal N: the shell's 128+N


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
