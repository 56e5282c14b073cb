"""Work Corral did not place on its nodes (scheduler/service/core/outside.py, api/webhook.py,
backends/kubernetes/others.py) with a scripted executor: counted before Corral places anything, kept across a
rebuild, and another scheduler's bind onto a full node refused with why. The same on a real API server with
kube-scheduler: tests/test_k8s_shared_nodes.py."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from kubernetes import client

from scheduler.backends.base import Held, SharesNodes
from scheduler.backends.kubernetes.others import OtherPods, pod_held
from scheduler.service.api.webhook import BindingWebhook, answer
from scheduler.service.core.loop import Core
from scheduler.service.core.outside import admit_binding
from tests.test_cluster_sync import ROOT, ClusterExecutor, make, placed_on, state, submit


@dataclass
class SharingExecutor(ClusterExecutor):
    """A scripted cluster whose nodes also run pods of others."""

    outside: dict[str, Held] = field(default_factory=dict)  # node -> what others hold, reported once
    pods: dict[tuple[str, str], tuple[str, Held]] = field(default_factory=dict)  # (namespace, name) -> uid, held
    admitted: list[tuple[str, str, Held]] = field(default_factory=list)

    def held(self, now: float) -> dict[str, Held]:
        out, self.outside = self.outside, {}
        return out

    def binding(self, namespace: str, pod: str) -> tuple[str, Held] | None:
        return self.pods.get((namespace, pod))

    def admit(self, uid: str, node: str, held: Held) -> None:
        self.admitted.append((uid, node, held))
        self.outside[node] = held  # as OtherPods does: counted at once


def sharing(tmp_path: Path) -> tuple[Core, SharingExecutor]:
    core, _, _ = make(tmp_path, "a", "b")
    ex = SharingExecutor()
    core.executor = ex
    return core, ex


def review(pod: str, node: str, namespace: str = "team") -> dict[str, object]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "r1",
            "kind": {"group": "", "version": "v1", "kind": "Binding"},
            "operation": "CREATE",
            "namespace": namespace,
            "name": pod,
            "object": {"metadata": {"name": pod, "namespace": namespace}, "target": {"kind": "Node", "name": node}},
        },
    }


def test_the_capability_is_recognised() -> None:
    assert isinstance(SharingExecutor(), SharesNodes) and not isinstance(ClusterExecutor(), SharesNodes)


def test_others_pods_count_before_corral_places_and_after_a_rebuild(tmp_path: Path) -> None:
    core, ex = sharing(tmp_path)
    ex.outside = {"a": Held(3, 0.0, 0.0), "b": Held(3, 0.0, 0.0)}
    j1, j2 = submit(core, 1), submit(core, 2)
    core.tick()
    core.tick()
    assert state(core, j1) == "running" and state(core, j2) == "pending"  # 1 GPU free on each node
    core.apply_queues(ROOT, {"queues": [{"name": "default", "quota": {"p": 8}}]}, "a rebuild")
    for _ in range(2):
        core.tick()
    assert state(core, j2) == "pending" and core.engine.node_room(placed_on(ex, j1).pop())[0] == 0
    ex.outside = {"b": Held(0, 0.0, 0.0)}  # their pods on b ended
    core.tick()
    core.tick()
    assert state(core, j2) == "running" and placed_on(ex, j2) == {"b"}


def test_a_bind_onto_a_corral_node_is_refused_without_room_and_counted_with_it(tmp_path: Path) -> None:
    core, ex = sharing(tmp_path)
    j = submit(core, 3)
    core.tick()
    on = placed_on(ex, j).pop()
    ex.pods = {("team", "big"): ("u1", Held(2, 0.0, 0.0)), ("team", "small"): ("u2", Held(1, 0.5, 1.0))}
    why = admit_binding(core, "team", "big", on)
    assert why is not None and f"node {on} is scheduled by Corral" in why and "2 GPUs asked, 1 free" in why
    assert admit_binding(core, "team", "small", on) is None and ex.admitted == [("u2", on, Held(1, 0.5, 1.0))]
    assert core.engine.node_room(on)[0] == 0  # counted now, before the watch sees the pod bound
    assert admit_binding(core, "team", "big", "elsewhere") is None  # not one of Corral's nodes
    assert admit_binding(core, "team", "gone", on) is None  # no such pod (or Corral's own): nothing to check
    out = answer(core, review("big", on))
    assert out["response"]["allowed"] is False and out["response"]["uid"] == "r1"
    assert "no room for pod team/big" in out["response"]["status"]["message"]


@pytest.mark.parametrize("bad", [None, [], {"request": {}}, {"request": {"uid": 5}}])
def test_a_review_that_is_not_one_is_refused_as_bad_input(tmp_path: Path, bad: object) -> None:
    core, _ = sharing(tmp_path)
    with pytest.raises(ValueError, match="not an AdmissionReview"):
        answer(core, bad)


def test_other_kinds_of_request_are_allowed_unchecked(tmp_path: Path) -> None:
    core, ex = sharing(tmp_path)
    r = review("p", "a")
    r["request"]["operation"] = "DELETE"  # type: ignore[index]
    assert answer(core, r)["response"]["allowed"] is True and ex.admitted == []


def test_what_a_pod_holds_counts_init_containers_as_the_kubelet_does() -> None:
    def c(cpu: str, mem: str, gpus: str | None = None) -> client.V1Container:
        limits = {"nvidia.com/gpu": gpus} if gpus else None
        return client.V1Container(
            name="c", resources=client.V1ResourceRequirements(requests={"cpu": cpu, "memory": mem}, limits=limits)
        )

    spec = client.V1PodSpec(containers=[c("500m", "1Gi", "2"), c("1", "1Gi")], init_containers=[c("4", "512Mi")])
    assert pod_held(spec) == Held(2, 4.0, 2.0)


def test_a_bind_allowed_but_never_seen_stops_counting() -> None:
    t = [0.0]
    others = OtherPods(client.CoreV1Api(client.ApiClient()), clock=lambda: t[0])
    others.admit("u", "a", Held(1, 1.0, 1.0))
    assert others.held() == {"a": Held(1, 1.0, 1.0)}
    t[0] = 31.0
    assert others.held() == {"a": Held(0, 0.0, 0.0)} and others.held() == {}


@pytest.mark.integration
def test_the_webhook_answers_only_at_its_token_path_and_a_silent_client_blocks_nobody(tmp_path: Path) -> None:
    core, _ = sharing(tmp_path)
    tls = tmp_path / "tls"
    tls.mkdir()
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "tls.key",
            "-out",
            "tls.crt",
            "-days",
            "1",
            "-subj",
            "/CN=corral",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        cwd=tls,
        check=True,
        capture_output=True,
    )
    (tls / "path-token").write_text("s3cret\n")
    hook = BindingWebhook(core, 0, tls, host="127.0.0.1").start()
    try:
        silent = socket.create_connection(("127.0.0.1", hook.port))  # connects, never says a word
        ctx = ssl.create_default_context(cafile=str(tls / "tls.crt"))

        def post(path: str) -> int:
            req = urllib.request.Request(
                f"https://127.0.0.1:{hook.port}{path}",
                data=json.dumps(review("p", "a")).encode(),
                headers={"Content-Type": "application/json"},
                method="POST",
            )
            try:
                with urllib.request.urlopen(req, context=ctx, timeout=5) as r:
                    return int(r.status)
            except urllib.error.HTTPError as e:
                return int(e.code)

        assert post("/bind/s3cret") == 200
        assert post("/bind") == 404 and post("/bind/guess") == 404
        silent.close()
    finally:
        hook.close()
