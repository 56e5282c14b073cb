"""Inside a sandbox's notebook server: Corral's idle-GPU warning for JupyterLab (server extension `sandbox.lab`).

`GET <base_url>corral/idle` answers the sandbox's idle stretch as Corral sees it (`idle` of
`GET /v1/sandboxes/{id}`: when it will be stopped, and the warning's text once it is warned), asked with the
server's own hub token (`JUPYTERHUB_API_TOKEN`, which Corral accepts as the user's). The lab extension
`corral-sandbox` (sandbox/jupyter/labextensions) polls it and shows the warning as a JupyterLab notification.
The spawner enables both through JUPYTER_CONFIG_PATH and JUPYTER_PATH (sandbox/jupyter); see docs/sandboxes.md.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import httpx
from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join
from tornado import web

JUPYTER_DIR = Path(__file__).resolve().parent / "jupyter"
CONFIG_DIR = JUPYTER_DIR / "config"  # jupyter_server_config.d/corral-sandbox.json: enables this extension
DATA_DIR = JUPYTER_DIR  # labextensions/corral-sandbox: the JupyterLab side


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "sandbox.lab"}]


class IdleHandler(APIHandler):
    """The sandbox's idle stretch, from Corral; `{"idle": null}` while it works or when Corral cannot say."""

    @web.authenticated
    async def get(self) -> None:
        url, job, token = (os.environ.get(k) for k in ("CORRAL_URL", "CORRAL_JOB_ID", "JUPYTERHUB_API_TOKEN"))
        idle: Any = None
        if url and job and token:
            try:
                async with httpx.AsyncClient(timeout=5) as http:
                    r = await http.get(
                        f"{url.rstrip('/')}/v1/sandboxes/{job}", headers={"Authorization": f"token {token}"}
                    )
                if r.status_code == 200:
                    idle = r.json().get("idle")
            except (httpx.HTTPError, ValueError) as e:
                self.log.info("corral: no idle status: %s", e)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"idle": idle}))


def _load_jupyter_server_extension(serverapp: Any) -> None:
    web_app = serverapp.web_app
    route = url_path_join(web_app.settings["base_url"], "corral", "idle")
    web_app.add_handlers(".*$", [(route, IdleHandler)])
