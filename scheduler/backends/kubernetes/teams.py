"""Teams on Kubernetes: namespace, RoleBindings, GPU quota and NetworkPolicies per leaf queue (docs/kubernetes.md)."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from quotas import QueueTree
from quotas.tree import Queue
from scheduler.backends.kubernetes import objects as k8s

# Corral role -> built-in ClusterRole in the team's namespace. Members get `view` rather than `edit`: edit could
# create pods that Corral never counted (their GPUs double-booked) and NetworkPolicies or pods labelled as another
# user, undoing sandbox isolation. A site that wants members to run pods themselves maps member to edit.
CLUSTER_ROLES: Mapping[str, str] = {
    "platform-admin": "admin",
    "team-admin": "admin",
    "member": "view",
    "model-owner": "view",
    "viewer": "view",
}
# JupyterHub's pods as the zero-to-jupyterhub chart labels them: the hub and the proxy that forwards to servers.
HUB_PODS: tuple[Mapping[str, str], ...] = ({"component": "hub"}, {"component": "proxy"})
QUEUE_ANNOTATION = "corral.dev/queue"  # the exact queue name (the team label is lossy: a DNS label)
PREFIX_ANNOTATION = "corral.dev/namespace-prefix"  # which installation owns the namespace
TEAM_POLICY = "corral-team-isolation"
MANAGED = f"{k8s.MANAGED_BY}=corral"
QUOTA_WAIT_S = 30.0


@dataclass(frozen=True)
class TeamConfig:
    """How teams map onto the cluster; the defaults are what the service uses."""

    prefix: str = "corral-"
    hub_namespace: str = "jupyterhub"
    hub_pods: Sequence[Mapping[str, str]] = HUB_PODS
    cluster_roles: Mapping[str, str] = field(default_factory=lambda: dict(CLUSTER_ROLES))
    # The device plugin's time-slicing: the most replicas per GPU of any node, and whether some node advertises
    # them as nvidia.com/gpu.shared (the executor fills both in from its nodes): the GPU quota counts replicas.
    gpu_replicas: int = 1
    gpu_shared: bool = False


def groups(leaf: Queue, role: str) -> list[str]:
    """The Kubernetes groups holding `role` over `leaf`: `corral:<role>` (unscoped), then `corral:<queue>:<role>`
    for each queue from the top down to it, so a team admin of `research` is an admin in the namespaces below it,
    as in Corral. The cluster's authentication (OIDC claims, certificates) names the groups; Corral does not."""
    if role == "platform-admin":
        return ["corral:platform-admin"]  # platform admins have no scope
    return [f"corral:{role}"] + [f"corral:{q.name}:{role}" for q in reversed(leaf.path)]


def gpu_cap(leaf: Queue, capacity: Mapping[str, int]) -> int:
    """The most GPUs the team's pods may request at once: its limit, the tightest on its path, summed over pools.
    Not its quota: Corral lets a team borrow up to its limit, and a quota at the guarantee would refuse those pods.
    Without a limit it may borrow a whole pool, so the pool's capacity counts."""
    total = 0
    for pool, cap in capacity.items():
        limit = min(q.limit_of(pool) for q in leaf.path)
        total += cap if math.isinf(limit) else int(limit)
    return total


def team_policy(namespace: str) -> dict[str, Any]:
    """A team's pods other than sandboxes accept ingress from their own namespace only (gangs still reach each
    other); sandboxes have their own, stricter, policies."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": TEAM_POLICY, "namespace": namespace, "labels": {k8s.MANAGED_BY: "corral"}},
        "spec": {
            "podSelector": {"matchExpressions": [{"key": k8s.KIND_LABEL, "operator": "NotIn", "values": ["sandbox"]}]},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {}}]}],
        },
    }


def sandbox_isolation(namespace: str, config: TeamConfig) -> dict[str, Any]:
    """The policy by which only the hub reaches a namespace's sandboxes: a sandbox pod never runs without it."""
    return k8s.network_policy(namespace, config.hub_namespace, config.hub_pods)


def owner_policy(namespace: str, pod_name: str, pod_uid: str, group: str, owner: str) -> dict[str, Any]:
    """One sandbox's pod also accepts ingress from its own user's pods in its namespace. Owned by the pod, so
    Kubernetes deletes it with the pod."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": k8s.dns_label(f"{pod_name}-owner"),
            "namespace": namespace,
            "labels": {k8s.MANAGED_BY: "corral", k8s.GROUP_LABEL: group},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": pod_name, "uid": pod_uid}],
        },
        "spec": {
            "podSelector": {"matchLabels": {k8s.GROUP_LABEL: group, k8s.KIND_LABEL: "sandbox"}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {k8s.OWNER_LABEL: owner}}}]}],
        },
    }


def team_objects(leaf: Queue, capacity: Mapping[str, int], config: TeamConfig) -> list[dict[str, Any]]:
    """One team's namespace (first) and what lives in it."""
    ns = k8s.team_namespace(leaf.name, config.prefix)
    namespace = k8s.namespace(ns, leaf.name)
    namespace["metadata"]["annotations"] = {QUEUE_ANNOTATION: leaf.name, PREFIX_ANNOTATION: config.prefix}
    by_cluster_role: dict[str, list[str]] = {}
    for role, cluster_role in config.cluster_roles.items():
        by_cluster_role.setdefault(cluster_role, []).extend(groups(leaf, role))
    bindings = [k8s.role_binding(ns, g, cr) for cr, g in sorted(by_cluster_role.items())]
    return [
        namespace,
        *bindings,
        k8s.resource_quota(ns, gpu_cap(leaf, capacity), config.gpu_replicas, config.gpu_shared),
        sandbox_isolation(ns, config),
        team_policy(ns),
    ]


def desired(tree: QueueTree, capacity: Mapping[str, int], config: TeamConfig) -> list[dict[str, Any]]:
    """Every team's objects; ValueError when two leaf queues would share a namespace (say "NLP" and "nlp")."""
    out: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    for leaf in tree.leaves:
        ns = k8s.team_namespace(leaf.name, config.prefix)
        if ns in seen:
            raise ValueError(f"queues {seen[ns]!r} and {leaf.name!r} would share namespace {ns}: rename one")
        seen[ns] = leaf.name
        out += team_objects(leaf, capacity, config)
    return out


# ----- making the cluster match -----


@dataclass
class Applied:
    """What a reconcile changed, as "Kind namespace/name"."""

    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)


def _ref(obj: Mapping[str, Any]) -> str:
    meta = obj["metadata"]
    return f"{obj['kind']} {meta['namespace'] + '/' if 'namespace' in meta else ''}{meta['name']}"


def covers(live: Any, want: Any) -> bool:
    """Whether the live object (as JSON) already says everything `want` says; fields the server added (defaults,
    status, other labels) do not count as differences."""
    if isinstance(want, Mapping):
        if not want:
            return live in (None, {})  # the server may drop an empty selector
        return isinstance(live, Mapping) and all(covers(live.get(k), v) for k, v in want.items())
    if isinstance(want, list):
        return isinstance(live, list) and len(live) == len(want) and all(map(covers, live, want))
    return bool(live == want)


class Reconciler:
    """Makes the cluster match the desired objects: creates what is missing, replaces what differs, and deletes what
    Corral made (managed-by corral, in namespaces of this prefix) that is no longer wanted. Each kind is listed
    once, so a sync that changes nothing costs four list calls."""

    def __init__(self, api: Any) -> None:
        self.api = api
        self.core: Any = client.CoreV1Api(api)
        # Kind -> (API object, the snake_case name in its methods): create_namespaced_<name> and so on.
        # NetworkPolicies first: a sync that fails part way must not leave a namespace without its isolation.
        self.kinds: dict[str, tuple[Any, str]] = {
            "NetworkPolicy": (client.NetworkingV1Api(api), "network_policy"),
            "RoleBinding": (client.RbacAuthorizationV1Api(api), "role_binding"),
            "ResourceQuota": (self.core, "resource_quota"),
        }

    def _listed(self, items: list[Any]) -> dict[tuple[str, str], dict[str, Any]]:
        """Listed objects as JSON, by (namespace, name); namespace "" for a namespace itself."""
        out: dict[tuple[str, str], dict[str, Any]] = {}
        for item in items:
            obj: dict[str, Any] = self.api.sanitize_for_serialization(item)
            out[(obj["metadata"].get("namespace", ""), obj["metadata"]["name"])] = obj
        return out

    def apply(self, want: list[dict[str, Any]], prefix: str) -> Applied:
        done = Applied()
        wanted_ns = {o["metadata"]["name"]: o for o in want if o["kind"] == "Namespace"}
        live_ns = {
            name: o["metadata"]
            for (_, name), o in self._listed(self.core.list_namespace(label_selector=MANAGED).items).items()
        }
        ours = {name for name, meta in live_ns.items() if meta.get("annotations", {}).get(PREFIX_ANNOTATION) == prefix}
        for name, obj in wanted_ns.items():
            self._namespace(obj, live_ns.get(name), done)
        leaving = ours - wanted_ns.keys()
        for kind, (api, method) in self.kinds.items():
            wanted = {(o["metadata"]["namespace"], o["metadata"]["name"]): o for o in want if o["kind"] == kind}
            listed = getattr(api, f"list_{method}_for_all_namespaces")(label_selector=MANAGED).items
            live = {key: o for key, o in self._listed(listed).items() if key[0] in ours | wanted_ns.keys()}
            for (ns, name), obj in wanted.items():
                if (ns, name) not in live:
                    getattr(api, f"create_namespaced_{method}")(ns, obj)
                    done.created.append(_ref(obj))
                elif not covers(live[(ns, name)], {k: v for k, v in obj.items() if k not in ("apiVersion", "kind")}):
                    getattr(api, f"replace_namespaced_{method}")(name, ns, obj)
                    done.updated.append(_ref(obj))
            for (ns, name), obj in live.items():
                # Per-sandbox policies belong to their pod (Kubernetes deletes them with it); a leaving namespace
                # takes its objects with it.
                if (ns, name) in wanted or ns in leaving or k8s.GROUP_LABEL in obj["metadata"].get("labels", {}):
                    continue
                self._delete(getattr(api, f"delete_namespaced_{method}"), name, ns)
                done.deleted.append(f"{kind} {ns}/{name}")
        self._await_quotas([r.split(" ", 1)[1] for r in done.created if r.startswith("ResourceQuota ")])
        for name in sorted(leaving):
            if not live_ns[name].get("deletionTimestamp"):
                self._delete(self.core.delete_namespace, name)
                done.deleted.append(f"Namespace {name}")
        return done

    def _namespace(self, want: dict[str, Any], live: dict[str, Any] | None, done: Applied) -> None:
        """Create the namespace, or adopt one that exists (made lazily by the executor, or by hand)."""
        meta = want["metadata"]
        if live is None:
            try:
                self.core.create_namespace(want)
                done.created.append(_ref(want))
                return
            except ApiException as e:
                if e.status != 409:
                    raise
        if live is None or not covers(live, meta):
            # A patch, not a replace: the namespace's finalizers and others' labels stay.
            self.core.patch_namespace(
                meta["name"], {"metadata": {"labels": meta["labels"], "annotations": meta["annotations"]}}
            )
            done.updated.append(_ref(want))

    def _await_quotas(self, refs: list[str]) -> None:
        """Until the quota controller has counted a new quota, the API server refuses every pod in its namespace
        ("status unknown for quota"): wait for it (it takes milliseconds), so a launch right after is not refused."""
        deadline = time.monotonic() + QUOTA_WAIT_S
        for ref in refs:
            ns, name = ref.split("/")
            while not (self.core.read_namespaced_resource_quota(name, ns).status.used or {}):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the quota controller has not counted ResourceQuota {ref}")
                time.sleep(0.05)

    @staticmethod
    def _delete(call: Any, *args: str) -> None:
        try:
            call(*args)
        except ApiException as e:
            if e.status != 404:  # gone already: what we wanted
                raise


def reconcile(api: Any, tree: QueueTree, capacity: Mapping[str, int], config: TeamConfig) -> Applied:
    """Make the cluster's team objects those of `tree`. Makes network calls: never call it inside a transaction."""
    return Reconciler(api).apply(desired(tree, capacity, config), config.prefix)
