"""Corral behind JupyterHub's proxy: the hub registers Corral as its service `corral` and its proxy
(configurable-http-proxy) forwards `<hub base URL>services/corral/...` to Corral with the whole path, so the SDK
inside a notebook finds Corral with no configuration (notebooks/config.py). This ASGI middleware strips that
prefix: `/services/corral/v1/jobs` is answered as `/v1/jobs`, with the prefix as the ASGI root_path (links the
API docs make then point back through the hub)."""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

HUB_SERVICE_PATH = "services/corral"  # the SDK's notebooks.config.HUB_SERVICE, under the hub's base URL


def hub_prefixes(configured: str | None, hub_api_url: str | None) -> list[str]:
    """The prefixes to strip, longest first: the configured one, else /services/corral and the one under the
    hub's base URL (hub_api_url's path without its final hub/api)."""
    if configured:
        return [configured.rstrip("/") or "/"]
    out = {f"/{HUB_SERVICE_PATH}"}
    if hub_api_url:
        path = urlsplit(hub_api_url).path.rstrip("/")
        base = path[: -len("hub/api")] if path.endswith("/hub/api") else "/"
        out.add(f"{base.rstrip('/')}/{HUB_SERVICE_PATH}")
    return sorted(out, key=len, reverse=True)


class HubPrefix:
    """Answer `<prefix>/...` as `/...` for each prefix (a request at the prefix itself is its root `/`)."""

    def __init__(self, app: ASGIApp, prefixes: Iterable[str]) -> None:
        self.app = app
        self.prefixes = [p for p in prefixes if p != "/"]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            path: str = scope.get("path", "")
            for prefix in self.prefixes:
                if path == prefix or path.startswith(prefix + "/"):
                    rest = path[len(prefix) :] or "/"
                    raw = scope.get("raw_path")
                    if isinstance(raw, bytes) and raw.startswith(prefix.encode()):
                        raw = raw[len(prefix.encode()) :] or b"/"
                    scope = {**scope, "path": rest, "raw_path": raw, "root_path": scope.get("root_path", "") + prefix}
                    break
        await self.app(scope, receive, send)
