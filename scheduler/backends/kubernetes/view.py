"""Objects of the API read from their JSON lazily, where the client's models would cost milliseconds each."""

from __future__ import annotations

import json
from typing import Any

MAPS = frozenset({"labels", "annotations", "nodeSelector", "limits", "requests"})  # free-form keys: kept dicts
CAMEL = {"pod_ip": "podIP", "host_ip": "hostIP"}  # the names the snake_case rule does not give
KEYS: dict[str, str] = {}  # attribute name -> JSON key (a few dozen names: the API's fields that Corral reads)


class View:
    """An object of the API read from its JSON the way the client's models are read (snake_case attributes, None
    when absent), converted only where read. The client's deserializer costs milliseconds per pod (5.7 ms measured
    here, under load), and the cache takes in several events per pod."""

    __slots__ = ("_raw",)

    def __init__(self, raw: dict[str, Any]) -> None:
        self._raw = raw

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        key = KEYS.get(name)
        if key is None:  # once per attribute name: converting it on every read was a tenth of the service's CPU
            head, *rest = name.split("_")
            key = KEYS[name] = CAMEL.get(name) or head + "".join(w[:1].upper() + w[1:] for w in rest)
        value = self._raw.get(key)
        if isinstance(value, dict):
            return value if key in MAPS else View(value)
        if isinstance(value, list):
            return [View(v) if isinstance(v, dict) else v for v in value]
        return value


def listed(resp: Any) -> tuple[list[Any], str]:
    """A LIST's items (as Views) and resourceVersion from its raw answer (_preload_content=False); a list read
    into models already (a fake API's) is taken as it is."""
    if hasattr(resp, "items"):
        return list(resp.items), str(resp.metadata.resource_version)
    body = json.loads(resp.data)
    return [View(p) for p in body.get("items") or []], str(body["metadata"]["resourceVersion"])
