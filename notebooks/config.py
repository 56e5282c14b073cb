"""Where the SDK finds the Corral API and the token it sends.

URL, first that applies:
 1. `Client(url=...)`;
 2. CORRAL_URL;
 3. inside a JupyterHub single-user server (JUPYTERHUB_API_TOKEN is set): the hub's `corral` service,
    `<origin><hub base URL>services/corral`, where the origin is that of JUPYTERHUB_PUBLIC_URL (else
    https://JUPYTERHUB_HOST) and the hub base URL is JUPYTERHUB_BASE_URL (else what precedes `user/<name>/`
    in JUPYTERHUB_SERVICE_PREFIX). A hub that publishes neither origin gives no URL: set CORRAL_URL;
 4. http://127.0.0.1:8265, where `corral serve` listens by default.

Token, first that applies: `Client(token=...)`; CORRAL_TOKEN; inside JupyterHub, the server's hub token
(JUPYTERHUB_API_TOKEN); else the admin token `corral serve` wrote to its data directory (CORRAL_DATA_DIR, else
$XDG_DATA_HOME/corral or ~/.local/share/corral), which is how the CLI works on the server's own machine.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from notebooks.errors import CorralError
from scheduler.service.core.settings import ADMIN_TOKEN_FILE, default_data_dir

DEFAULT_URL = "http://127.0.0.1:8265"
HUB_SERVICE = "corral"  # the name the Corral API is registered under as a JupyterHub service
# JupyterHub's single-user prefix is f"{base_url}user/{escaped name}/" (+ f"{server name}/" for named servers);
# names are URL-escaped, so they hold no "/".
_USER_PREFIX = re.compile(r"^(?P<base>.*/)user/[^/]+/(?:[^/]+/)?$")


@dataclass(frozen=True)
class Connection:
    """Where to send requests and with which token; `token_source` says where the token came from, so a 401
    can tell the user what to fix."""

    url: str
    token: str | None
    token_source: str


def resolve(url: str | None = None, token: str | None = None, environ: Mapping[str, str] | None = None) -> Connection:
    """Apply the rules of the module docstring. `environ` defaults to os.environ (tests pass their own)."""
    env = os.environ if environ is None else environ
    in_hub = bool(env.get("JUPYTERHUB_API_TOKEN"))
    found_url = url or env.get("CORRAL_URL") or (hub_service_url(env) if in_hub else None) or DEFAULT_URL
    if token:
        return Connection(found_url.rstrip("/"), token, "Client(token=...)")
    if env.get("CORRAL_TOKEN"):
        return Connection(found_url.rstrip("/"), env["CORRAL_TOKEN"], "CORRAL_TOKEN")
    if in_hub:
        return Connection(found_url.rstrip("/"), env["JUPYTERHUB_API_TOKEN"], "JUPYTERHUB_API_TOKEN")
    secret, source = _admin_token(env)
    return Connection(found_url.rstrip("/"), secret, source)


def hub_service_url(env: Mapping[str, str]) -> str:
    """The `corral` JupyterHub service as seen from a single-user server (rule 3 of the module docstring)."""
    public = env.get("JUPYTERHUB_PUBLIC_URL", "")
    parts = urlsplit(public)
    origin = f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else ""
    if not origin and env.get("JUPYTERHUB_HOST"):
        host = env["JUPYTERHUB_HOST"]
        origin = host if "://" in host else f"https://{host}"
    if not origin:
        raise CorralError(
            "no_url",
            "running inside JupyterHub, but neither CORRAL_URL nor JUPYTERHUB_PUBLIC_URL "
            "(nor JUPYTERHUB_HOST) is set, so the corral service cannot be found: set "
            "CORRAL_URL, or pass Client(url=...)",
            "CORRAL_URL",
        )
    base = env.get("JUPYTERHUB_BASE_URL", "")
    if not base:
        m = _USER_PREFIX.match(env.get("JUPYTERHUB_SERVICE_PREFIX", ""))
        base = m.group("base") if m else "/"
    if not base.endswith("/"):
        base += "/"
    return f"{origin.rstrip('/')}{base}services/{HUB_SERVICE}"


def _admin_token(env: Mapping[str, str]) -> tuple[str | None, str]:
    data = Path(env["CORRAL_DATA_DIR"]) if env.get("CORRAL_DATA_DIR") else default_data_dir()
    path = data / ADMIN_TOKEN_FILE
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None, f"no token given, no CORRAL_TOKEN and no {path}"
    except OSError as e:
        return None, f"cannot read {path}: {e.strerror}"
    return (text or None), str(path)
