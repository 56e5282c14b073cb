"""A thin typed wrapper over kubernetes.client.CustomObjectsApi for Kueue's ResourceFlavor, Cohort, ClusterQueue
and LocalQueue (v1beta2): create, get, list, apply (create, or replace what is there) and delete."""

from __future__ import annotations

import builtins
from collections.abc import Iterable
from typing import Any, TypeVar, cast

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from scheduler.kueue.models import GROUP, VERSION, KueueObject

K = TypeVar("K", bound=KueueObject)
CONFLICT = 409


class KueueClient:
    """Kueue objects through one Kubernetes API client (kubernetes.client.ApiClient)."""

    def __init__(self, api_client: Any):
        self.api = client.CustomObjectsApi(api_client)

    def create(self, obj: K) -> K:
        body = obj.to_dict()
        if obj.NAMESPACED:
            made = self.api.create_namespaced_custom_object(
                GROUP, VERSION, _ns(type(obj), obj.metadata.namespace), obj.PLURAL, body
            )
        else:
            made = self.api.create_cluster_custom_object(GROUP, VERSION, obj.PLURAL, body)
        return type(obj).from_dict(_body(made))

    def get(self, kind: type[K], name: str, namespace: str | None = None) -> K:
        if kind.NAMESPACED:
            got = self.api.get_namespaced_custom_object(GROUP, VERSION, _ns(kind, namespace), kind.PLURAL, name)
        else:
            got = self.api.get_cluster_custom_object(GROUP, VERSION, kind.PLURAL, name)
        return kind.from_dict(_body(got))

    def list(self, kind: type[K], namespace: str | None = None, label_selector: str = "") -> builtins.list[K]:
        """All objects of a kind (a namespaced kind: in `namespace`, or in every namespace when None)."""
        if kind.NAMESPACED and namespace is not None:
            got = self.api.list_namespaced_custom_object(
                GROUP, VERSION, namespace, kind.PLURAL, label_selector=label_selector
            )
        else:
            got = self.api.list_cluster_custom_object(GROUP, VERSION, kind.PLURAL, label_selector=label_selector)
        return [kind.from_dict({"kind": kind.KIND, **item}) for item in _body(got)["items"]]

    def apply(self, obj: K) -> K:
        """Create the object, or replace the spec, labels and annotations of the one of that name.

        A replace, not a server-side apply: these objects are Corral's (labelled managed-by corral), so the exported
        spec is the whole truth. The replace carries the resourceVersion read just before, so a concurrent writer
        makes it fail with 409 rather than be overwritten unseen."""
        try:
            return self.create(obj)
        except ApiException as e:
            if e.status != CONFLICT:
                raise
        current = self.get(type(obj), obj.metadata.name, obj.metadata.namespace)
        body = obj.to_dict()
        body["metadata"]["resourceVersion"] = current.metadata.resource_version
        if obj.NAMESPACED:
            made = self.api.replace_namespaced_custom_object(
                GROUP, VERSION, _ns(type(obj), obj.metadata.namespace), obj.PLURAL, obj.metadata.name, body
            )
        else:
            made = self.api.replace_cluster_custom_object(GROUP, VERSION, obj.PLURAL, obj.metadata.name, body)
        return type(obj).from_dict(_body(made))

    def apply_all(self, objects: Iterable[KueueObject]) -> builtins.list[KueueObject]:
        """`apply` each in turn (export's order creates what is referenced first)."""
        return [self.apply(o) for o in objects]

    def delete(self, kind: type[KueueObject], name: str, namespace: str | None = None) -> None:
        if kind.NAMESPACED:
            self.api.delete_namespaced_custom_object(GROUP, VERSION, _ns(kind, namespace), kind.PLURAL, name)
        else:
            self.api.delete_cluster_custom_object(GROUP, VERSION, kind.PLURAL, name)


def _ns(kind: type[KueueObject], namespace: str | None) -> str:
    if namespace is None:
        raise ValueError(f"a {kind.KIND} lives in a namespace: give one")
    return namespace


def _body(answer: object) -> dict[str, Any]:
    """The custom-objects API answers plain JSON objects; its stubs say `object`."""
    return cast(dict[str, Any], answer)
