"""High availability for real (issue 23): two `corral serve` replicas on one PostgreSQL database and the test
control plane, authenticated with the chart's ServiceAccount token (its Role for the Lease included).

- kill -9 the leader while jobs arrive: the follower leads within the lease duration, every job submitted (to
  either replica: the follower forwards) is there, and no pod is bound twice (one live attempt per job, no node's
  GPUs over-committed).
- a leader cut off from the API server, or only from the database, stops scheduling (it exits) and the other leads.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from kubernetes.client.exceptions import ApiException

from scheduler.backends.kubernetes import objects as k8s
from tests.ha_kit import Relay, Replica, Replicas, admin_token, base_env, request, token_kubeconfig
from tests.k8s_kit import CORRAL_NS, ControlPlane, delete_namespaces, shared_plane, until
from tests.service_kit import database_url

pytestmark = pytest.mark.integration  # the Kubernetes test control plane

NODES, GPUS = 2, 8


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[ControlPlane, str, str, list[str]]]:
    """kwok nodes of this test, a fresh PostgreSQL database, the Lease cleared (a dead holder's would make the first
    leader wait out its duration)."""
    plane = shared_plane(request.config)
    plane.corral_client()  # the chart's RBAC, Role for the Lease included
    tag = uuid.uuid4().hex[:5]
    nodes = [f"ha-{tag}-{i}" for i in range(NODES)]
    for n in nodes:
        plane.create_gpu_node(n, product=f"HA-{tag}", gpus=GPUS, labels={"corral.dev/test": tag})
    for n in nodes:
        plane.wait_node_ready(n)
    with contextlib.suppress(ApiException):
        plane.coordination().delete_namespaced_lease("corral-leader", CORRAL_NS)
    for url in database_url("postgresql", tmp_path):
        yield plane, tag, url, nodes
    for n in nodes:
        with contextlib.suppress(ApiException):
            plane.core().delete_node(n)
    delete_namespaces(plane.core(), f"h{tag}-")


def leader_of(replicas: list[Replica], timeout: float = 120) -> Replica:
    found: list[Replica] = []

    def one() -> bool:
        found[:] = [r for r in replicas if r.proc.poll() is None and r.role() == "leader"]
        return len(found) == 1

    try:
        until("one leader", one, timeout)
    except TimeoutError:
        raise AssertionError("\n".join(f"--- {r.name}:\n{r.tail()}" for r in replicas)) from None
    return found[0]


def pods_on(plane: ControlPlane, nodes: list[str]) -> list[Any]:
    return [
        p
        for p in plane.core().list_pod_for_all_namespaces(label_selector=f"{k8s.MANAGED_BY}=corral").items
        if p.spec.node_name in nodes and p.metadata.deletion_timestamp is None
    ]


def check_nothing_bound_twice(plane: ControlPlane, nodes: list[str]) -> None:
    pods = pods_on(plane, nodes)
    per_job = Counter(p.metadata.labels[k8s.JOB_LABEL] for p in pods)
    assert [j for j, n in per_job.items() if n > 1] == [], "a job runs twice"
    per_node = Counter()  # type: Counter[str]
    for p in pods:
        per_node[p.spec.node_name] += int(p.spec.containers[0].resources.limits[k8s.GPU])
    assert all(n <= GPUS for n in per_node.values()), per_node


def test_kill_9_the_leader_while_jobs_arrive(cluster: tuple[ControlPlane, str, str, list[str]], tmp_path: Path) -> None:
    plane, tag, db, nodes = cluster
    token = admin_token(db)
    env = base_env(plane, token_kubeconfig(plane, tmp_path / "kubeconfig"), db, tag)
    reps = Replicas(env, tmp_path / "replicas")
    try:
        a, b = reps.start("a"), reps.start("b")
        first = leader_of([a, b])
        other = b if first is a else a
        until("the follower ready", lambda: other.ready().get("role") == "follower", 30)
        pool = f"HA-{tag}"
        keys: list[str] = []

        def submit(target: Replica, n: int) -> None:
            for i in range(n):
                key = f"{target.name}-{len(keys)}-{i}"
                body = {"queue": "default", "pool": pool, "gpus": 1, "command": "sleep inf", "idempotency_key": key}
                for _ in range(200):  # a 503 during the failover: the same request again
                    code, _ = request(target.url + "/v1/jobs", token, "POST", body)
                    if code in (200, 201):
                        keys.append(key)
                        break
                    time.sleep(0.3)
                time.sleep(0.05)

        submit(other, 6)  # forwarded to the leader
        submit(first, 6)
        assert len(keys) == 12
        until("the first jobs running", lambda: len(pods_on(plane, nodes)) >= 10, 60)
        arriving = threading.Thread(target=submit, args=(other, 10), daemon=True)
        arriving.start()
        time.sleep(1.0)
        killed_at = time.monotonic()
        first.kill()
        until("the follower leads", lambda: other.role() == "leader", 45)
        failover = time.monotonic() - killed_at
        arriving.join(60)
        assert len(keys) == 22
        # Every job accepted is there, 16 of them running (the GPUs there are), none twice.
        code, listed = request(other.url + "/v1/jobs?limit=100", token)
        assert code == 200, listed
        until("16 jobs running", lambda: len(pods_on(plane, nodes)) == NODES * GPUS, 90)
        code, listed = request(other.url + "/v1/jobs?limit=100", token)
        states = Counter(j["state"] for j in listed["jobs"])
        assert sum(states.values()) == 22 and states["running"] == 16, states
        check_nothing_bound_twice(plane, nodes)
        print(f"failover: {failover:.1f} s (lease 12 s)")
        assert failover < 12 + 2 * 2 + 10, failover  # the lease, two rounds, the new leader's start (a busy CI)
    finally:
        reps.stop()


@pytest.mark.parametrize("cut", ["apiserver", "database"])
def test_a_leader_cut_off_stops_scheduling_and_the_other_leads(
    cluster: tuple[ControlPlane, str, str, list[str]], tmp_path: Path, cut: str
) -> None:
    plane, tag, db, nodes = cluster
    token = admin_token(db)
    kube = token_kubeconfig(plane, tmp_path / "kubeconfig")
    env = base_env(plane, kube, db, tag)
    reps = Replicas(env, tmp_path / "replicas")
    host, port = plane.server.split("://")[1].rsplit(":", 1)
    relay = Relay((host, int(port))) if cut == "apiserver" else Relay(pg_address(db))
    try:
        if cut == "apiserver":  # a's only way to the API server is the relay
            a = reps.start(
                "a",
                CORRAL_K8S_KUBECONFIG=str(
                    token_kubeconfig(plane, tmp_path / "kubeconfig-a", f"https://127.0.0.1:{relay.port}")
                ),
            )
        else:  # a's only way to the database is the relay
            a = reps.start("a", CORRAL_DATABASE_URL=via(db, relay.port))
        assert leader_of([a]) is a
        b = reps.start("b")
        until("b follows", lambda: b.role() == "follower", 60)
        code, _ = request(
            b.url + "/v1/jobs",
            token,
            "POST",
            {"queue": "default", "pool": f"HA-{tag}", "gpus": 8, "command": "sleep inf"},
        )
        assert code in (200, 201)
        until("a's job running", lambda: len(pods_on(plane, nodes)) == 1, 60)
        cut_at = time.monotonic()
        relay.cut()
        until("a stops (exits)", lambda: a.proc.poll() is not None, 30)
        stopped = time.monotonic() - cut_at
        assert a.proc.returncode == 3, a.tail()
        assert stopped < 8 + 2 * 2 + 3, stopped  # the renew deadline, a round or two
        assert leader_of([b], 45) is b
        code, _ = request(
            b.url + "/v1/jobs",
            token,
            "POST",
            {"queue": "default", "pool": f"HA-{tag}", "gpus": 8, "command": "sleep inf"},
        )
        until("b schedules", lambda: len(pods_on(plane, nodes)) == 2, 60)
        check_nothing_bound_twice(plane, nodes)
    finally:
        relay.cut()
        reps.stop()


def pg_address(url: str) -> tuple[str, int]:
    u = sa.engine.make_url(url)
    return u.host or "127.0.0.1", u.port or 5432


def via(url: str, port: int) -> str:
    return sa.engine.make_url(url).set(host="127.0.0.1", port=port).render_as_string(hide_password=False)
