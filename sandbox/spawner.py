"""CorralSpawner: JupyterHub single-user servers as Corral sandboxes (entry point `corral`).

The hub asks Corral for a sandbox on the user's team queue: non-preemptible, within the team's guarantee
(counting its non-preemptible GPUs). It starts at once or is refused at once, with the guarantee's numbers or why
no room can be made; the user sees that message, never a timeout. In the embedded mode Corral's local executor
runs the server as a process on the GPUs it chose (CUDA_VISIBLE_DEVICES); on Kubernetes it is a pod, and Corral
says where it listens (its pod's IP). Stopping the server closes the sandbox and frees the GPUs at once.
"""

from __future__ import annotations

import asyncio
import html
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import httpx
from jupyterhub.spawner import Spawner, SpawnException
from jupyterhub.utils import random_port
from traitlets import Bool, Dict, Float, List, Unicode, default

from sandbox import lab
from sandbox.profiles import Profile, allowed, parse_profiles

POLL_S = 0.5  # how often start() looks whether an admitted sandbox runs and Corral knows where
OPEN = ("starting", "running")  # a sandbox's states before it ends


class SandboxRefused(SpawnException):  # type: ignore[misc]
    """Corral said no; the message says why (the guarantee's numbers, or why no room can be made), shown to the user."""

    def __init__(self, message: str):
        super().__init__(message, reason="corral_refused", status_code=409)
        # What the hub shows the user (its spawn page, progress events, API errors) is `jupyterhub_message`, else
        # str(): SpawnException's str() is "409 SandboxRefused(reason=corral_refused): ...", so say it plainly.
        self.jupyterhub_message = message

    def __str__(self) -> str:
        return str(self.message)


def sandbox_request(
    user: str,
    queue: str,
    profile: Profile,
    command: Sequence[str],
    env: Mapping[str, str],
    workdir: str | None = None,
    server: str = "",
) -> dict[str, Any]:
    """The body of POST /v1/sandboxes for this user and profile (a pure builder, tested as a dict); a named server
    (JupyterHub's allow_named_servers) is `jupyter-<user>-<server>`."""
    name = f"jupyter-{user}-{server}" if server else f"jupyter-{user}"
    body: dict[str, Any] = {
        "name": name,
        "queue": queue,
        "owner": user,
        # A MIG profile's sandbox asks its slice; its share of a GPU follows from the profile (the service's rule).
        **({"mig": profile.mig} if profile.mig is not None else {"gpus": profile.gpus}),
        "command": list(command),
        "env": dict(env),
        "profile": profile.name,
    }
    if profile.cpus:
        body["cpus"] = profile.cpus
    if profile.memory_gb:
        body["memory_gb"] = profile.memory_gb
    if profile.idle_timeout_s is not None:
        body["idle_timeout_s"] = profile.idle_timeout_s
    if workdir:
        body["workdir"] = workdir
    return body


def team_queue(groups: Iterable[str], group_queues: Mapping[str, str]) -> str | None:
    """The user's team queue: its first group (by name) that maps to a queue, as Corral decides it too."""
    return next((group_queues[g] for g in sorted(groups) if g in group_queues), None)


class CorralSpawner(Spawner):  # type: ignore[misc]
    """Spawns single-user servers as Corral sandboxes."""

    corral_url = Unicode(config=True, help="Corral's API, e.g. http://127.0.0.1:8265 (default: $CORRAL_URL).")
    corral_token = Unicode(
        config=True,
        help=(
            "A Corral platform-admin token: the hub opens sandboxes on behalf of its users (default: "
            "$CORRAL_HUB_TOKEN)."
        ),
    )
    group_queues = Dict(config=True, help="Hub group -> Corral leaf queue; the same map as Corral's hub_groups.")
    profiles: Any = List(
        config=True,
        help=(
            "Sandbox shapes users choose from: dicts with name, display, gpus, cpus, memory_gb, idle_timeout_s and "
            "groups (who may use it; empty: everyone)."
        ),
    )
    default_queue = Unicode("", config=True, help="Queue for users in no mapped group (empty: refuse them).")
    http_timeout = Float(10.0, config=True, help="Seconds to wait for one answer from Corral.")
    lab_extension = Bool(
        True,
        config=True,
        help=(
            "Enable Corral's JupyterLab extension in the server (the idle-GPU warning as a notification): "
            "JUPYTER_CONFIG_PATH and JUPYTER_PATH get sandbox/jupyter of this installation, which the server's "
            "machine must have at the same path (the same image or virtualenv); elsewhere it is ignored."
        ),
    )

    @default("default_url")
    def _lab(self) -> str:
        return "/lab"  # JupyterLab, not jupyter-server's bare "A Jupyter Server is running." page

    @default("corral_url")
    def _url(self) -> str:
        return os.environ.get("CORRAL_URL", "http://127.0.0.1:8265")

    @default("corral_token")
    def _token(self) -> str:
        return os.environ.get("CORRAL_HUB_TOKEN", "")

    @default("options_form")
    def _form(self) -> Any:
        return self._options_form

    def _groups(self) -> list[str]:
        return [g.name for g in self.user.groups]

    def _profiles(self) -> list[Profile]:
        return allowed(parse_profiles(self.profiles), self._groups())

    def _options_form(self, _spawner: Spawner) -> str:
        shapes = self._profiles()
        if len(shapes) <= 1:
            return ""  # nothing to choose
        options = "".join(f'<option value="{html.escape(p.name)}">{html.escape(p.display)}</option>' for p in shapes)
        return f'<label for="profile">Sandbox</label><select name="profile" class="form-control">{options}</select>'

    def options_from_form(self, formdata: dict[str, list[str]]) -> dict[str, str]:
        return {"profile": formdata.get("profile", [""])[0]}

    def _chosen(self) -> Profile:
        shapes = self._profiles()
        if not shapes:
            raise SandboxRefused(f"no sandbox profile is open to the groups of {self.user.name}")
        wanted = (self.user_options or {}).get("profile") or shapes[0].name
        for p in shapes:
            if p.name == wanted:
                return p
        raise SandboxRefused(f"profile {wanted!r} is not open to {self.user.name}'s groups")

    # ----- talking to Corral -----

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        async with httpx.AsyncClient(
            base_url=self.corral_url,
            timeout=self.http_timeout,
            headers={"Authorization": f"Bearer {self.corral_token}"},
        ) as http:
            return await http.request(method, path, json=body)

    # ----- the Spawner API -----

    job_id = None  # Corral's id of the running sandbox (persisted with get_state)

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        self.job_id = state.get("corral_job")

    def get_state(self) -> dict[str, Any]:
        state: dict[str, Any] = super().get_state()
        if self.job_id is not None:
            state["corral_job"] = self.job_id
        return state

    def clear_state(self) -> None:
        super().clear_state()
        self.job_id = None

    async def start(self) -> tuple[str, int]:
        queue = team_queue(self._groups(), self.group_queues) or self.default_queue
        if not queue:
            raise SandboxRefused(f"{self.user.name} is in no group that has a Corral queue")
        profile = self._chosen()
        self.port = random_port()
        env = self.get_env()
        # The SDK inside the notebook finds Corral here, and authenticates with the server's hub token
        # (JUPYTERHUB_API_TOKEN), which carries the user's custom:corral:* scopes when the hub's `server`
        # role inherits them.
        env.setdefault("CORRAL_URL", self.corral_url)
        if self.lab_extension:
            for var, path in (("JUPYTER_CONFIG_PATH", lab.CONFIG_DIR), ("JUPYTER_PATH", lab.DATA_DIR)):
                env[var] = os.pathsep.join(p for p in (str(path), env.get(var, "")) if p)
        body = sandbox_request(
            self.user.name, queue, profile, [*self.cmd, *self.get_args()], env, self.notebook_dir or None, self.name
        )
        r = await self._call("POST", "/v1/sandboxes", body)
        if r.status_code != 201:
            raise SandboxRefused(_message(r))
        view: dict[str, Any] = r.json()
        self.job_id = view["id"]
        # Admitted at once; the server starts as soon as GPUs taken back from borrowers are free, and on
        # Kubernetes Corral knows its address once the pod has an IP. The hub's start_timeout bounds the wait.
        while view["state"] in OPEN and not view.get("address"):
            await asyncio.sleep(POLL_S)
            view = await self._view()
        if view["state"] != "running":
            raise SandboxRefused(f"the sandbox ended before it started ({view['state']})")
        return (view["address"]["host"], int(view["address"]["port"]))

    async def _view(self) -> dict[str, Any]:
        """The sandbox as Corral shows it (state, address); state "gone" once Corral has forgotten it."""
        r = await self._call("GET", f"/v1/sandboxes/{self.job_id}")
        if r.status_code == 404:
            return {"state": "gone"}
        r.raise_for_status()
        view: dict[str, Any] = r.json()
        return view

    async def poll(self) -> int | None:
        if self.job_id is None:
            return 0
        return None if (await self._view())["state"] in OPEN else 0

    async def stop(self, now: bool = False) -> None:
        if self.job_id is None:
            return
        r = await self._call("DELETE", f"/v1/sandboxes/{self.job_id}")
        if r.status_code not in (200, 404, 409):  # 409: it had ended already
            r.raise_for_status()


def _message(r: httpx.Response) -> str:
    try:
        err = r.json()["error"]
        return str(err["message"])
    except (ValueError, KeyError, TypeError):
        return f"Corral answered {r.status_code}"
