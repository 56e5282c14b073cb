"""Teams on Kubernetes (scheduler/backends/kubernetes/teams.py) and sandbox pods (kubernetes/sandbox.py).

The builders are checked as dicts; the reconciler, the policies' selectors and a sandbox opened through the service
run against the real test control plane (tests/k8s_kit.py). There is no CNI there, so NetworkPolicies are not
enforced: the tests check that the API server accepts them and that their selectors, asked of the API server as
label selectors, pick exactly the pods they should. Cluster tests skip without scripts/k8s-tools' binaries.
"""

from __future__ import annotations

import contextlib
import copy
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from quotas import QueueSpec, QueueTree
from scheduler.backends.base import Launch, server_port
from scheduler.backends.kubernetes import objects as k8s
from scheduler.backends.kubernetes import sandbox as k8s_sandbox
from scheduler.backends.kubernetes import teams as k8s_teams
from scheduler.backends.kubernetes.executor import KubernetesExecutor, discover_nodes
from scheduler.service.api.auth import Principal, Role
from scheduler.service.api.errors import Conflict
from scheduler.service.core.assemble import build_core
from scheduler.service.core.sandboxes import SandboxRequest, open_sandbox, sandbox_view
from scheduler.service.core.settings import ServiceSettings
from tests.k8s_kit import ControlPlane, delete_namespaces, shared_plane, until
from tests.marks import starts_processes

IMAGE = "busybox:1.36"
POOL = "H100"
CAPACITY = {POOL: 16, "A100": 8}


def tree(*specs: QueueSpec) -> QueueTree:
    return QueueTree(specs, CAPACITY)


DEMO = tree(
    QueueSpec("research", quota={POOL: 8}, limit={POOL: 12}),
    QueueSpec("nlp", "research", quota={POOL: 4}),
    QueueSpec("vision", "research", quota={POOL: 4}, limit={POOL: 6, "A100": 2}),
    QueueSpec("product", quota={POOL: 8}),
)


def by_kind(objs: list[dict[str, Any]], ns: str) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for o in objs:
        if o["metadata"].get("namespace", o["metadata"]["name"]) == ns:
            out.setdefault(o["kind"], []).append(o)
    return out


# ----- the builders, as dicts -----


def test_one_namespace_per_leaf_with_the_queue_and_prefix_kept() -> None:
    objs = k8s_teams.desired(DEMO, CAPACITY, k8s_teams.TeamConfig("c-"))
    names = [o["metadata"]["name"] for o in objs if o["kind"] == "Namespace"]
    assert names == ["c-nlp", "c-product", "c-vision"]  # leaves only; `research` is an inner queue
    (ns,) = by_kind(objs, "c-nlp")["Namespace"]
    assert ns["metadata"]["labels"] == {k8s.MANAGED_BY: "corral", k8s.TEAM_LABEL: "nlp", **k8s.POD_SECURITY}
    assert ns["metadata"]["annotations"] == {k8s_teams.QUEUE_ANNOTATION: "nlp", k8s_teams.PREFIX_ANNOTATION: "c-"}
    assert all(o["metadata"]["labels"][k8s.MANAGED_BY] == "corral" for o in objs)


def test_role_bindings_map_corral_roles_over_the_queue_path() -> None:
    objs = by_kind(k8s_teams.desired(DEMO, CAPACITY, k8s_teams.TeamConfig()), "corral-nlp")
    bindings = {b["roleRef"]["name"]: [s["name"] for s in b["subjects"]] for b in objs["RoleBinding"]}
    # A team admin of `research` (a token scoped to it) is an admin in nlp's namespace, as in Corral.
    assert bindings == {
        "admin": ["corral:platform-admin", "corral:team-admin", "corral:research:team-admin", "corral:nlp:team-admin"],
        "view": [
            "corral:member",
            "corral:research:member",
            "corral:nlp:member",
            "corral:model-owner",
            "corral:research:model-owner",
            "corral:nlp:model-owner",
            "corral:viewer",
            "corral:research:viewer",
            "corral:nlp:viewer",
        ],
    }
    rb = objs["RoleBinding"][0]
    assert rb["metadata"]["name"] == "corral-team-admin" and rb["roleRef"]["kind"] == "ClusterRole"
    assert all(s["kind"] == "Group" for s in rb["subjects"])
    assert set(k8s_teams.CLUSTER_ROLES) == {r.value for r in Role}  # every Corral role is mapped
    # A site may let members run pods themselves.
    edit = k8s_teams.TeamConfig(cluster_roles={**k8s_teams.CLUSTER_ROLES, "member": "edit"})
    objs = by_kind(k8s_teams.desired(DEMO, CAPACITY, edit), "corral-nlp")
    assert {b["roleRef"]["name"] for b in objs["RoleBinding"]} == {"admin", "edit", "view"}


def test_the_gpu_quota_is_the_limit_on_the_path_or_the_pools() -> None:
    objs = k8s_teams.desired(DEMO, CAPACITY, k8s_teams.TeamConfig())

    def hard(ns: str) -> dict[str, str]:
        (q,) = by_kind(objs, ns)["ResourceQuota"]
        spec: dict[str, str] = q["spec"]["hard"]
        return spec

    # nlp: no limit of its own; research's 12 of H100 binds it; nothing limits it on A100 (8).
    assert hard("corral-nlp") == {"requests.nvidia.com/gpu": "20"}
    assert hard("corral-vision") == {"requests.nvidia.com/gpu": "8"}  # its own 6 (under 12) + 2
    assert hard("corral-product") == {"requests.nvidia.com/gpu": "24"}  # unlimited: both pools


def test_network_policies_isolate_sandboxes_and_teams() -> None:
    config = k8s_teams.TeamConfig(hub_namespace="hub")
    sandbox, team = by_kind(k8s_teams.desired(DEMO, CAPACITY, config), "corral-nlp")["NetworkPolicy"]
    assert sandbox["spec"]["podSelector"] == {"matchLabels": {k8s.KIND_LABEL: "sandbox"}}
    assert sandbox["spec"]["policyTypes"] == ["Ingress"]
    hub_ns = {"matchLabels": {"kubernetes.io/metadata.name": "hub"}}
    assert sandbox["spec"]["ingress"] == [
        {
            "from": [
                {"namespaceSelector": hub_ns, "podSelector": {"matchLabels": {"component": "hub"}}},
                {"namespaceSelector": hub_ns, "podSelector": {"matchLabels": {"component": "proxy"}}},
            ]
        }
    ]
    assert team["spec"]["podSelector"] == {
        "matchExpressions": [{"key": k8s.KIND_LABEL, "operator": "NotIn", "values": ["sandbox"]}]
    }
    assert team["spec"]["ingress"] == [{"from": [{"podSelector": {}}]}]  # its own namespace only
    mine = k8s_teams.owner_policy("corral-nlp", "corral-7-1-0", "uid-1", "corral-7-1", "ann")
    assert mine["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Pod", "name": "corral-7-1-0", "uid": "uid-1"}
    ]
    assert mine["spec"]["podSelector"] == {"matchLabels": {k8s.GROUP_LABEL: "corral-7-1", k8s.KIND_LABEL: "sandbox"}}
    assert mine["spec"]["ingress"] == [{"from": [{"podSelector": {"matchLabels": {k8s.OWNER_LABEL: "ann"}}}]}]


def test_queues_sharing_a_namespace_are_refused() -> None:
    with pytest.raises(ValueError, match="share namespace corral-nlp"):
        k8s_teams.desired(tree(QueueSpec("NLP"), QueueSpec("nlp")), CAPACITY, k8s_teams.TeamConfig())


def test_owner_label_values_are_valid_and_one_to_one() -> None:
    users = ["ann", "Ann", "ann@example.com", "ann-example-com", "a--b", "x", "-", "é", "x" * 70, "ann.b_c"]
    values = [k8s.label_value(u) for u in users]
    assert len(set(values)) == len(users)
    assert values[0] == "ann" and values[1] == "Ann" and values[-1] == "ann.b_c"  # valid ones are kept
    assert all(k8s._LABEL_VALUE.fullmatch(v) and len(v) <= 63 for v in values)


def test_covers_ignores_what_the_server_adds() -> None:
    live = {
        "spec": {"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}], "ports": None}]},
        "metadata": {"labels": {"a": "1", "b": "2"}, "uid": "x"},
    }
    want = {"spec": {"ingress": [{"from": [{"podSelector": {}}]}]}, "metadata": {"labels": {"a": "1"}}}
    assert k8s_teams.covers(live, want)
    assert k8s_teams.covers({"spec": {}}, {"spec": {"podSelector": {}}})  # an empty selector the server dropped
    assert not k8s_teams.covers(live, {"metadata": {"labels": {"a": "2"}}})
    assert not k8s_teams.covers({"l": [1, 2]}, {"l": [1]})


def test_a_sandbox_pod_is_kubespawners_with_corrals_parts() -> None:
    env = {
        "CORRAL_QUEUE": "nlp",
        "CORRAL_OWNER": "ann",
        k8s_sandbox.KIND_ENV: "sandbox",
        "JUPYTERHUB_SERVICE_URL": "http://127.0.0.1:5678/user/ann/",
    }
    p = k8s_sandbox.pod(
        "7",
        2,
        0,
        namespace="corral-nlp",
        node="n1",
        gpus=2,
        image="jupyter:1",
        command=["jupyterhub-singleuser", "--debug"],
        env=env,
        grace_s=5,
    )
    job = k8s.pod(
        "7",
        2,
        0,
        namespace="corral-nlp",
        node="n1",
        gpus=2,
        image="jupyter:1",
        command=["jupyterhub-singleuser", "--debug"],
        env=env,
        grace_s=5,
        kind="sandbox",
    )
    assert k8s_sandbox.is_sandbox(env) and not k8s_sandbox.is_sandbox({"CORRAL_KIND": "job"})
    # Corral's parts: the same name, labels and annotations as a job's pod, so the executor treats it alike.
    assert p["metadata"] == job["metadata"] and p["metadata"]["labels"][k8s.KIND_LABEL] == "sandbox"
    assert p["metadata"]["labels"][k8s.OWNER_LABEL] == "ann"
    spec = p["spec"]
    assert spec["schedulerName"] == "corral" and "nodeName" not in spec  # bound by Corral, Binding API
    assert spec["restartPolicy"] == "Never" and spec["terminationGracePeriodSeconds"] == 5
    assert spec["tolerations"] == job["spec"]["tolerations"]
    # KubeSpawner's: its notebook container, the command as args, the hub's port, no API token in the pod.
    assert spec["automountServiceAccountToken"] is False
    (c,) = spec["containers"]
    assert c["name"] == "notebook" and c["args"] == ["jupyterhub-singleuser", "--debug"] and "command" not in c
    assert c["ports"] == [{"containerPort": 5678, "name": "notebook-port"}]
    assert c["resources"]["limits"] == {"nvidia.com/gpu": "2"}
    # Confined like a job's pod: non-root (the Jupyter images' jovyan), no escalation, no capabilities, seccomp.
    assert c["securityContext"] == {
        "runAsUser": 1000,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }
    assert spec["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    other = k8s_sandbox.pod(
        "7",
        2,
        0,
        namespace="corral-nlp",
        node="n1",
        gpus=2,
        image="jupyter:1",
        command=["lab"],
        env=env,
        run_as_user=4242,
    )
    assert other["spec"]["securityContext"]["runAsUser"] == 4242
    assert other["spec"]["containers"][0]["securityContext"]["runAsUser"] == 4242
    assert c["env"] == job["spec"]["containers"][0]["env"]
    assert server_port({}) == 8888


def test_a_sandbox_pod_requests_its_cpus_and_memory() -> None:
    env = {k8s_sandbox.KIND_ENV: "sandbox"}
    p = k8s_sandbox.pod(
        "7", 1, 0, namespace="ns", node="n1", gpus=1, image="jupyter:1", command=["lab"], env=env, cpus=4, memory_gb=16
    )
    job = k8s.pod(
        "7", 1, 0, namespace="ns", node="n1", gpus=1, image="jupyter:1", command=["lab"], env=env, cpus=4, memory_gb=16
    )
    (c,) = p["spec"]["containers"]
    assert (
        c["resources"]
        == job["spec"]["containers"][0]["resources"]
        == {"limits": {"nvidia.com/gpu": "1", "memory": "16384Mi"}, "requests": {"cpu": "4000m", "memory": "16384Mi"}}
    )


def test_a_users_notebooks_live_on_their_own_claim_mounted_by_every_sandbox_of_theirs() -> None:
    """Per-user notebook storage: one PVC per user (a pure builder), mounted at the notebook directory by every
    attempt of every sandbox of theirs, so a stopped and started server (a new pod) finds the files again."""
    store = k8s_sandbox.NotebookStorage(size="20Gi", storage_class="fast-ssd")
    claim = k8s_sandbox.user_claim("corral-nlp", "ann", store)
    assert claim == {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": k8s_sandbox.claim_name("ann"),
            "namespace": "corral-nlp",
            "labels": {
                k8s.OWNER_LABEL: "ann",
                "app.kubernetes.io/managed-by": "corral",
                "corral.dev/purpose": "notebook-home",
            },
        },
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": "20Gi"}},
            "storageClassName": "fast-ssd",
        },
    }
    assert "storageClassName" not in k8s_sandbox.user_claim("ns", "ann", k8s_sandbox.NotebookStorage())["spec"]
    assert k8s_sandbox.claim_name("ann") != k8s_sandbox.claim_name("Ann") != k8s_sandbox.claim_name("ann.")
    assert all(
        len(k8s_sandbox.claim_name(u)) <= 63 and k8s_sandbox.claim_name(u).startswith("corral-home-")
        for u in ("ann", "x" * 200, "Ann Lee@example.org", "...")
    )
    env = {k8s_sandbox.KIND_ENV: "sandbox"}
    first, again = (
        k8s_sandbox.pod(
            "7",
            attempt,
            0,
            namespace="corral-nlp",
            node="n1",
            gpus=1,
            image="jupyter:1",
            command=["lab"],
            env=env,
            home_claim=claim["metadata"]["name"],
            home_path="/home/jovyan",
        )
        for attempt in (1, 2)
    )
    for p in (first, again):
        assert p["spec"]["volumes"] == [
            {"name": "home", "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]}}
        ]
        (c,) = p["spec"]["containers"]
        assert c["volumeMounts"] == [{"name": "home", "mountPath": "/home/jovyan"}]
        assert c["workingDir"] == "/home/jovyan"  # the server's root directory
        assert p["spec"]["securityContext"]["fsGroup"] == 1000  # the non-root server may write the volume
    assert first["metadata"]["name"] != again["metadata"]["name"]
    bare = k8s_sandbox.pod("7", 1, 0, namespace="ns", node="n1", gpus=1, image="jupyter:1", command=["lab"], env=env)
    assert not bare["spec"].get("volumes") and "fsGroup" not in bare["spec"]["securityContext"]


# ----- on the test control plane -----


@pytest.fixture(scope="module")
@starts_processes
def plane(request: pytest.FixtureRequest) -> ControlPlane:
    return shared_plane(request.config)


@pytest.fixture
def prefix(plane: ControlPlane) -> Iterator[str]:
    """A namespace prefix of this test's own; its namespaces go afterwards."""
    p = f"t{uuid.uuid4().hex[:5]}-"
    yield p
    core = plane.core()
    delete_namespaces(core, p)


def selector(sel: Mapping[str, Any]) -> str:
    """A LabelSelector as the label_selector string the API server takes."""
    parts = [f"{k}={v}" for k, v in sel.get("matchLabels", {}).items()]
    for e in sel.get("matchExpressions", []):
        op, key, values = e["operator"], e["key"], ",".join(e.get("values", []))
        parts.append(
            {
                "In": f"{key} in ({values})",
                "NotIn": f"{key} notin ({values})",
                "Exists": key,
                "DoesNotExist": f"!{key}",
            }[op]
        )
    return ",".join(parts)


def team_state(plane: ControlPlane, prefix: str) -> dict[str, dict[str, Any]]:
    """What the cluster holds for namespaces of `prefix`: namespace -> {kind/name: JSON}."""
    api = plane.api_client()
    out: dict[str, dict[str, Any]] = {}
    for ns in plane.core().list_namespace().items:
        if ns.metadata.name.startswith(prefix) and ns.metadata.deletion_timestamp is None:
            out[ns.metadata.name] = {}
    lists = [
        client.RbacAuthorizationV1Api(api).list_role_binding_for_all_namespaces,
        plane.core().list_resource_quota_for_all_namespaces,
        client.NetworkingV1Api(api).list_network_policy_for_all_namespaces,
    ]
    for listing in lists:
        for o in listing().items:
            if o.metadata.namespace in out:
                j = api.sanitize_for_serialization(o)
                out[o.metadata.namespace][f"{type(o).__name__[2:]}/{o.metadata.name}"] = j
    return out


def test_reconciler_applies_updates_removes_and_is_idempotent(plane: ControlPlane, prefix: str, tmp_path: Path) -> None:
    ex = KubernetesExecutor(plane.corral_client(), tmp_path, IMAGE, namespace_prefix=prefix, hub_namespace="hub")
    first = ex.sync_teams(DEMO, CAPACITY)
    state = team_state(plane, prefix)
    assert sorted(state) == [f"{prefix}nlp", f"{prefix}product", f"{prefix}vision"]
    assert sorted(state[f"{prefix}nlp"]) == [
        "NetworkPolicy/corral-sandbox-isolation",
        "NetworkPolicy/corral-team-isolation",
        "ResourceQuota/corral-gpus",
        "RoleBinding/corral-team-admin",
        "RoleBinding/corral-team-view",
    ]
    assert state[f"{prefix}nlp"]["ResourceQuota/corral-gpus"]["spec"]["hard"] == {"requests.nvidia.com/gpu": "20"}
    assert len(first.created) == 3 * 6 and not first.updated and not first.deleted
    assert ex.sync_teams(DEMO, CAPACITY) == k8s_teams.Applied()  # nothing differs: nothing written

    # A hand edit is put back; an object Corral does not manage is left alone.
    core = plane.core()
    core.patch_namespaced_resource_quota(
        "corral-gpus", f"{prefix}nlp", {"spec": {"hard": {"requests.nvidia.com/gpu": "99"}}}
    )
    core.create_namespaced_config_map(f"{prefix}nlp", {"metadata": {"name": "theirs"}})
    assert ex.sync_teams(DEMO, CAPACITY).updated == [f"ResourceQuota {prefix}nlp/corral-gpus"]

    # A changed tree: vision goes, nlp gets a limit of its own, a new team comes, members may edit.
    changed = tree(
        QueueSpec("research", quota={POOL: 8}, limit={POOL: 12}),
        QueueSpec("nlp", "research", quota={POOL: 4}, limit={POOL: 5, "A100": 0}),
        QueueSpec("speech", "research", quota={POOL: 4}),
        QueueSpec("product", quota={POOL: 8}),
    )
    ex.teams = k8s_teams.TeamConfig(prefix, "hub", cluster_roles={**k8s_teams.CLUSTER_ROLES, "member": "edit"})
    applied = ex.sync_teams(changed, CAPACITY)
    assert f"Namespace {prefix}speech" in applied.created
    assert f"ResourceQuota {prefix}nlp/corral-gpus" in applied.updated
    assert f"RoleBinding {prefix}nlp/corral-team-edit" in applied.created
    assert f"RoleBinding {prefix}nlp/corral-team-view" in applied.updated  # members left it
    assert applied.deleted == [f"Namespace {prefix}vision"]
    state = team_state(plane, prefix)
    assert sorted(state) == [f"{prefix}nlp", f"{prefix}product", f"{prefix}speech"]
    assert state[f"{prefix}nlp"]["ResourceQuota/corral-gpus"]["spec"]["hard"] == {"requests.nvidia.com/gpu": "5"}
    edit = state[f"{prefix}nlp"]["RoleBinding/corral-team-edit"]["subjects"]
    assert [s["name"] for s in edit] == ["corral:member", "corral:research:member", "corral:nlp:member"]
    assert core.read_namespaced_config_map("theirs", f"{prefix}nlp").metadata.name == "theirs"
    assert ex.sync_teams(changed, CAPACITY) == k8s_teams.Applied()
    # A binding no longer wanted in a kept namespace goes; another installation's namespaces are not touched.
    ex.teams = k8s_teams.TeamConfig(prefix, "hub")
    assert ex.sync_teams(changed, CAPACITY).deleted == [
        f"RoleBinding {prefix}nlp/corral-team-edit",
        f"RoleBinding {prefix}product/corral-team-edit",
        f"RoleBinding {prefix}speech/corral-team-edit",
    ]
    other = KubernetesExecutor(plane.corral_client(), tmp_path, IMAGE, namespace_prefix=f"{prefix}x-")
    assert other.sync_teams(tree(QueueSpec("solo", quota={POOL: 1})), CAPACITY).deleted == []
    assert f"{prefix}nlp" in team_state(plane, prefix)


def make_pod(core: Any, ns: str, name: str, labels: dict[str, str]) -> None:
    """A pod nobody schedules (no scheduler has this name): only its labels matter here. Confined as team
    namespaces require (Pod Security "restricted")."""
    core.create_namespaced_pod(
        ns,
        {
            "metadata": {"name": name, "labels": labels},
            "spec": {
                "schedulerName": "nobody",
                "securityContext": k8s.pod_security(),
                "containers": [{"name": "c", "image": IMAGE, "securityContext": k8s.container_security()}],
            },
        },
    )


@pytest.mark.parametrize(
    ("what", "pod_spec", "container"),
    [
        ("root", {"securityContext": {"runAsUser": 0}}, {}),
        ("privileged", {}, {"securityContext": {"privileged": True}}),
        ("host path", {"volumes": [{"name": "host", "hostPath": {"path": "/"}}]}, {}),
        ("host network", {"hostNetwork": True}, {}),
        ("added capability", {}, {"securityContext": {"capabilities": {"add": ["SYS_ADMIN"], "drop": ["ALL"]}}}),
        ("no security context", {"securityContext": {}}, {"securityContext": {}}),
    ],
)
def test_a_team_namespace_refuses_pods_that_are_not_restricted(
    plane: ControlPlane, prefix: str, what: str, pod_spec: dict[str, Any], container: dict[str, Any]
) -> None:
    """Pod Security Admission on the team's namespace: a pod made by hand there (a team admin holds the admin
    ClusterRole in it) cannot escape to the node, even though Corral would bind it; Corral's own pods pass."""
    core = plane.core()
    ex = KubernetesExecutor(plane.corral_client(), Path("/nonexistent"), IMAGE, namespace_prefix=prefix)
    ex.sync_teams(tree(QueueSpec("a", quota={POOL: 8})), CAPACITY)
    ns = f"{prefix}a"
    ours = k8s.pod("1", 1, 0, namespace=ns, node="none", gpus=0, image=IMAGE, command=["sleep", "inf"])
    core.create_namespaced_pod(ns, ours)  # accepted
    bad = copy.deepcopy(ours)
    bad["metadata"]["name"] = "bad"
    bad["spec"].update(pod_spec)
    bad["spec"]["containers"][0].update(container)
    with pytest.raises(ApiException) as refused:
        core.create_namespaced_pod(ns, bad)
    assert refused.value.status == 403 and "PodSecurity" in refused.value.body, what


def allowed_sources(plane: ControlPlane, ns: str, pod: str) -> set[str]:
    """The pods ("namespace/name") the NetworkPolicies of `ns` let reach `pod`, found with the policies' own
    selectors as label selectors on the API server: what a CNI would enforce. Every pod when none selects it."""
    core, net = plane.core(), client.NetworkingV1Api(plane.api_client())
    sources: set[str] = set()
    selected = False
    for pol in net.list_namespaced_network_policy(ns).items:
        spec = plane.api_client().sanitize_for_serialization(pol.spec)
        picked = core.list_namespaced_pod(ns, label_selector=selector(spec.get("podSelector", {}))).items
        if pod not in {p.metadata.name for p in picked}:
            continue
        selected = True
        for rule in spec.get("ingress", []):
            for peer in rule.get("from", []):
                spaces = (
                    [ns]
                    if "namespaceSelector" not in peer
                    else [
                        n.metadata.name
                        for n in core.list_namespace(label_selector=selector(peer["namespaceSelector"])).items
                    ]
                )
                for space in spaces:
                    found = core.list_namespaced_pod(space, label_selector=selector(peer.get("podSelector", {})))
                    sources |= {f"{space}/{p.metadata.name}" for p in found.items}
    assert selected, f"no NetworkPolicy selects {ns}/{pod}"
    return sources


def test_policies_let_only_the_hub_and_the_owner_reach_a_sandbox(
    plane: ControlPlane, prefix: str, tmp_path: Path
) -> None:
    core = plane.core()
    hub = f"{prefix}hub"
    core.create_namespace({"metadata": {"name": hub}})
    ex = KubernetesExecutor(plane.corral_client(), tmp_path, IMAGE, namespace_prefix=prefix, hub_namespace=hub)
    ex.sync_teams(tree(QueueSpec("a", quota={POOL: 8}), QueueSpec("b", quota={POOL: 8})), CAPACITY)
    a, b = f"{prefix}a", f"{prefix}b"
    make_pod(core, hub, "hub", {"component": "hub"})
    make_pod(core, hub, "proxy", {"component": "proxy"})
    make_pod(core, hub, "other", {"component": "singleuser-server"})
    for ns in (a, b):
        for owner in ("ann", "bob"):
            make_pod(core, ns, f"job-{owner}", {k8s.KIND_LABEL: "job", k8s.OWNER_LABEL: owner})
    # ann's sandbox in team a, with the policy its launch makes (isolate reads the pod's uid).
    sandbox = k8s_sandbox.pod(
        "s1",
        1,
        0,
        namespace=a,
        node="none",
        gpus=0,
        image=IMAGE,
        command=["sleep", "inf"],
        env={"CORRAL_QUEUE": "a", "CORRAL_OWNER": "ann", k8s_sandbox.KIND_ENV: "sandbox"},
    )
    sandbox["spec"]["schedulerName"] = "nobody"
    core.create_namespaced_pod(a, sandbox)
    k8s_sandbox.isolate(core, [sandbox])
    k8s_sandbox.isolate(core, [sandbox])  # a retried launch: the policy exists, fine
    make_pod(core, a, "bob-sandbox", {k8s.KIND_LABEL: "sandbox", k8s.OWNER_LABEL: "bob"})

    name = sandbox["metadata"]["name"]
    assert allowed_sources(plane, a, name) == {f"{hub}/hub", f"{hub}/proxy", f"{a}/job-ann", f"{a}/{name}"}
    assert allowed_sources(plane, a, "bob-sandbox") == {f"{hub}/hub", f"{hub}/proxy"}
    # Jobs hear their own team only; team b's pods hear nothing from team a.
    team_a = {f"{a}/{p}" for p in ("job-ann", "job-bob", name, "bob-sandbox")}
    assert allowed_sources(plane, a, "job-bob") == team_a
    assert allowed_sources(plane, b, "job-ann") == {f"{b}/job-ann", f"{b}/job-bob"}


def test_a_sandbox_opened_through_the_service_runs_as_a_kubespawner_pod_in_its_team(
    plane: ControlPlane, prefix: str, tmp_path: Path
) -> None:
    product = f"NVIDIA-T-{prefix.strip('-')}"
    node = f"{prefix}gpu"
    plane.create_gpu_node(node, product=product, gpus=8)
    with contextlib.ExitStack() as closing:
        closing.callback(plane.core().delete_node, node)
        plane.wait_node_ready(node)
        api = plane.corral_client()  # Corral as the chart deploys it
        nodes = [n for n in discover_nodes(api) if n.pool == product]
        ex = KubernetesExecutor(
            api, tmp_path / "k8s", IMAGE, grace_s=1, namespace_prefix=prefix, hub_namespace=f"{prefix}hub"
        )
        closing.callback(ex.close)  # the node and pod watches the service's cycles start
        core = build_core(ServiceSettings(data_dir=tmp_path / "data", grace_s=1), executor=ex, nodes=nodes)
        assert f"{prefix}default" in team_state(plane, prefix)  # synced at start
        root = Principal("root", Role.PLATFORM_ADMIN)
        core.apply_queues(
            root,
            {
                "queues": [
                    {"name": "alpha", "quota": {product: 2}, "limit": {product: 6}},
                    {"name": "beta", "quota": {product: 6}},
                ]
            },
        )
        state = team_state(plane, prefix)  # synced by the apply: default gone, alpha and beta there
        assert sorted(state) == [f"{prefix}alpha", f"{prefix}beta"]
        assert state[f"{prefix}alpha"]["ResourceQuota/corral-gpus"]["spec"]["hard"] == {"requests.nvidia.com/gpu": "6"}

        ann = Principal("ann", Role.MEMBER, "alpha")
        req = SandboxRequest(
            queue="alpha",
            gpus=2,
            cpus=2,
            memory_gb=8,
            command=["jupyterhub-singleuser"],
            image=IMAGE,
            env={"JUPYTERHUB_SERVICE_URL": "http://0.0.0.0:7001/user/ann/"},
        )
        with pytest.raises(Conflict, match="holds 0 non-preemptible GPUs .* needs 3: 3 > quota 2"):
            open_sandbox(core, ann, req.model_copy(update={"gpus": 3}))  # over the guarantee: refused now
        job = open_sandbox(core, ann, req)
        assert job["state"] == "running"
        ns = f"{prefix}alpha"
        pod = plane.wait_pod(ns, k8s.pod_name(str(job["id"]), 1, 0))
        assert pod.spec.node_name == node and pod.spec.scheduler_name == "corral"  # bound by Corral
        (c,) = pod.spec.containers
        assert c.name == "notebook" and c.args == ["/bin/sh", "-c", "jupyterhub-singleuser"]  # KubeSpawner's
        assert c.ports[0].container_port == 7001 and pod.spec.automount_service_account_token is False
        assert c.resources.limits == {"nvidia.com/gpu": "2", "memory": "8Gi"}  # the API server's canonical form
        assert c.resources.requests == {"nvidia.com/gpu": "2", "cpu": "2", "memory": "8Gi"}
        assert pod.metadata.labels[k8s.KIND_LABEL] == "sandbox" and pod.metadata.labels[k8s.OWNER_LABEL] == "ann"
        # Where the hub connects: the pod's IP (kwok gives its pods one) and the port from the hub's URL.
        with core.db.connect() as conn:
            row = core.readable(conn, ann, job["id"])
        view = sandbox_view(core, row)
        assert view["address"] == {"host": pod.status.pod_ip, "port": 7001} and pod.status.pod_ip
        assert view["url"] == f"http://{pod.status.pod_ip}:7001"
        assert allowed_sources(plane, ns, pod.metadata.name) == {f"{ns}/{pod.metadata.name}"}  # no hub pods here
        mine: Any = client.NetworkingV1Api(api).read_namespaced_network_policy(f"{pod.metadata.name}-owner", ns)
        assert mine.metadata.owner_references[0].uid == pod.metadata.uid

        # The guarantee is used up: another sandbox is refused at once, nothing is started.
        with pytest.raises(Conflict, match="guarantee"):
            open_sandbox(core, ann, req.model_copy(update={"gpus": 1}))
        # Closing frees it; the pod goes, and Kubernetes deletes its policy with it.
        core.cancel(ann, job["id"])
        net: Any = client.NetworkingV1Api(api)

        def gone() -> bool:
            core.tick()
            names = {p.metadata.name for p in net.list_namespaced_network_policy(ns).items}
            return not plane.core().list_namespaced_pod(ns).items and f"{pod.metadata.name}-owner" not in names

        until("the sandbox's pod and policy gone", gone)
        assert open_sandbox(core, ann, req)["state"] == "running"


def test_a_sandbox_never_runs_without_its_namespaces_isolation(
    plane: ControlPlane, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert next(iter(k8s_teams.Reconciler(plane.api_client()).kinds)) == "NetworkPolicy"  # made first by a sync
    node = f"{prefix}iso"
    plane.create_gpu_node(node, product=f"NVIDIA-I-{prefix.strip('-')}", gpus=8)
    with contextlib.ExitStack() as closing:
        closing.callback(plane.core().delete_node, node)
        ex = KubernetesExecutor(
            plane.corral_client(), tmp_path, IMAGE, grace_s=1, namespace_prefix=prefix, hub_namespace=f"{prefix}hub"
        )
        env = {"CORRAL_QUEUE": "fresh", "CORRAL_OWNER": "ann", k8s_sandbox.KIND_ENV: "sandbox"}
        net: Any = client.NetworkingV1Api(plane.api_client())

        def refused(*_: Any, **__: Any) -> None:
            raise ApiException(status=403, reason="Forbidden")

        with monkeypatch.context() as m:  # the policy cannot be made: no sandbox pod either
            m.setattr(client.NetworkingV1Api, "create_namespaced_network_policy", refused)
            with pytest.raises(OSError, match="403"):
                ex.launch(Launch("s2", 1, "lab", {node: [0]}, env))
        ns = f"{prefix}fresh"  # made by the launch, never synced
        assert plane.core().list_namespaced_pod(ns).items == []
        ex.launch(Launch("s2", 2, "lab", {node: [0]}, env))
        policy = net.read_namespaced_network_policy("corral-sandbox-isolation", ns)
        assert policy.spec.pod_selector.match_labels == {k8s.KIND_LABEL: "sandbox"}


def test_a_sandbox_started_again_mounts_its_users_same_claim(plane: ControlPlane, prefix: str, tmp_path: Path) -> None:
    """On the control plane: the executor makes the user's claim on their first sandbox and mounts it in the pod of
    every later attempt (a server stopped and started again). The admin's client: the chart's ClusterRole has no
    persistentvolumeclaims (k8s_notebook_storage_size is off by default)."""
    node = f"{prefix}home"
    plane.create_gpu_node(node, product=f"NVIDIA-H-{prefix.strip('-')}", gpus=8)
    with contextlib.ExitStack() as closing:
        closing.callback(plane.core().delete_node, node)
        ex = KubernetesExecutor(
            plane.api_client(),
            tmp_path,
            IMAGE,
            grace_s=1,
            namespace_prefix=prefix,
            hub_namespace=f"{prefix}hub",
            notebook_storage=k8s_sandbox.NotebookStorage(size="1Gi", storage_class="standard"),
        )
        closing.callback(ex.close)
        env = {"CORRAL_QUEUE": "lab", "CORRAL_OWNER": "ann", k8s_sandbox.KIND_ENV: "sandbox"}
        ns = f"{prefix}lab"
        claims = []
        for attempt in (1, 2):
            ex.launch(Launch("s9", attempt, "lab", {node: [0]}, env, owner="ann"))
            pod = plane.wait_pod(ns, k8s.pod_name("s9", attempt, 0))
            (vol,) = [v for v in pod.spec.volumes if v.name == "home"]
            claims.append(vol.persistent_volume_claim.claim_name)
            (c,) = pod.spec.containers
            assert [(m.name, m.mount_path) for m in c.volume_mounts if m.name == "home"] == [("home", "/home/jovyan")]
            assert c.working_dir == "/home/jovyan"
        assert claims == [k8s_sandbox.claim_name("ann")] * 2
        made = plane.core().read_namespaced_persistent_volume_claim(claims[0], ns)
        assert made.spec.resources.requests == {"storage": "1Gi"} and made.spec.storage_class_name == "standard"
        assert len(plane.core().list_namespaced_persistent_volume_claim(ns).items) == 1
