"""Failover time of high availability: two `corral serve` replicas (PostgreSQL, backend kubernetes, the chart's
ServiceAccount) on the test control plane; the leader is killed with SIGKILL, and the time is taken until the other
says it leads (/readyz), and until a job submitted right after the kill has its pod bound. The killed replica is then
started again (it follows) and the next trial kills whichever leads.

    python benchmarks/failover.py --trials 5                         # the defaults: lease 12 s, renew 8 s, retry 2 s
    python benchmarks/failover.py --trials 5 --lease 6 --renew 4     # a shorter lease

Needs scripts/k8s-tools and a PostgreSQL server (CORRAL_TEST_POSTGRES_URL, as scripts/postgres prints it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scheduler.backends.kubernetes import objects as k8s  # noqa: E402  (run as a script from anywhere)
from tests.ha_kit import Replicas, admin_token, base_env, request, token_kubeconfig  # noqa: E402
from tests.k8s_kit import ControlPlane, find_bin_dir  # noqa: E402


def wait(cond: object, timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(step)
    return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--lease", type=float, default=12.0)
    ap.add_argument("--renew", type=float, default=8.0)
    ap.add_argument("--retry", type=float, default=2.0)
    args = ap.parse_args()
    bin_dir, why = find_bin_dir()
    admin_url = os.environ.get("CORRAL_TEST_POSTGRES_URL")
    if bin_dir is None or not admin_url:
        sys.exit(f"needs the Kubernetes tools ({why or 'ok'}) and CORRAL_TEST_POSTGRES_URL")
    work = Path(tempfile.mkdtemp(prefix="corral-failover-"))
    (work / "plane").mkdir()
    plane = ControlPlane(bin_dir, work / "plane")
    name = f"corral_failover_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    db = sa.engine.make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    reps: Replicas | None = None
    try:
        plane.start()
        tag = uuid.uuid4().hex[:5]
        nodes = [f"fo-{tag}-{i}" for i in range(2)]
        for n in nodes:
            plane.create_gpu_node(n, product=f"FO-{tag}", gpus=8, labels={"corral.dev/test": tag})
        for n in nodes:
            plane.wait_node_ready(n)
        plane.corral_client()
        token = admin_token(db)
        env = {
            **base_env(plane, token_kubeconfig(plane, work / "kubeconfig"), db, tag),
            "CORRAL_LEASE_S": str(args.lease),
            "CORRAL_RENEW_DEADLINE_S": str(args.renew),
            "CORRAL_LEADER_RETRY_S": str(args.retry),
        }
        reps = Replicas(env, work / "replicas")
        live = [reps.start("r0"), reps.start("r1")]
        leads: list[float] = []
        binds: list[float] = []
        for trial in range(args.trials):
            if not wait(
                lambda pair=live: (
                    sum(r.role() == "leader" for r in pair) == 1
                    and all(r.role() in ("leader", "follower") for r in pair)
                ),
                90,
                0.5,
            ):
                sys.exit("no leader: " + " | ".join(r.tail(5) for r in live))
            leader = next(r for r in live if r.role() == "leader")
            survivor = next(r for r in live if r is not leader)
            killed = time.monotonic()
            leader.kill()
            job = {
                "queue": "default",
                "pool": f"FO-{tag}",
                "gpus": 1,
                "command": "sleep inf",
                "idempotency_key": f"trial-{trial}",
            }
            jid = None
            while jid is None and time.monotonic() - killed < 120:  # 503 until the survivor leads
                code, body = request(survivor.url + "/v1/jobs", token, "POST", job)
                jid = body["id"] if code in (200, 201) else None
                if jid is None:
                    time.sleep(0.1)
            wait(lambda s=survivor: s.role() == "leader", 120)
            leads.append(time.monotonic() - killed)
            label = f"{k8s.JOB_LABEL}={k8s.dns_label(str(jid))}"
            wait(
                lambda lb=label: any(
                    p.spec.node_name for p in plane.core().list_pod_for_all_namespaces(label_selector=lb).items
                ),
                120,
            )
            binds.append(time.monotonic() - killed)
            print(
                json.dumps(
                    {"trial": trial, "leads_after_s": round(leads[-1], 1), "first_bind_after_s": round(binds[-1], 1)}
                ),
                flush=True,
            )
            live = [survivor, reps.start(f"r{trial + 2}")]
        summary = {
            "lease_s": args.lease,
            "renew_deadline_s": args.renew,
            "retry_s": args.retry,
            "trials": args.trials,
            "leads_after_s": {
                "min": round(min(leads), 1),
                "median": round(statistics.median(leads), 1),
                "max": round(max(leads), 1),
            },
            "first_bind_after_s": {
                "min": round(min(binds), 1),
                "median": round(statistics.median(binds), 1),
                "max": round(max(binds), 1),
            },
        }
        print(json.dumps(summary), flush=True)
    finally:
        if reps is not None:
            reps.stop()
        plane.stop()
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
