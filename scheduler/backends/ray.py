"""Runs admitted attempts on a Ray cluster through the Ray Jobs API; Corral keeps queues, quotas and decisions.

- discover_ray: the cluster's alive GPU nodes, read from the dashboard's state API, become NodeInfo; a node's pool
  is its accelerator type (Ray's "accelerator_type:X" resource), or "ray" when it declares none.
- RayExecutor: each attempt is one Ray job with the deterministic submission id corral-<job>-<attempt>, so a
  restarted Corral finds it again. One worker is pinned to the node Corral chose (label ray.io/node-id) with its
  GPUs as entrypoint_num_gpus; a gang runs ray_gang.py as its entrypoint, which reserves a placement group first.

GPU sharing: a share of one GPU is a fractional entrypoint_num_gpus (Ray packs fractional GPUs so that each device's
shares sum to at most 1, and sets CUDA_VISIBLE_DEVICES to that one device). Ray knows no MIG: a node that declares
custom resources "mig-<profile>" (ray start --resources '{"mig-1g.10gb": 7}') offers those slices, and a MIG job
asks one of them; which instance it uses is the node's business (Ray sets no MIG UUID).

Ray assigns GPU indices itself (a job sees CUDA_VISIBLE_DEVICES as Ray sets it): the indices in Launch.gpus are
Corral's bookkeeping of how many GPUs of which node are taken, not the devices a job gets. See docs/ray.md.
"""

from __future__ import annotations

import contextlib
import math
import os
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from ray.job_submission import JobStatus, JobSubmissionClient

from scheduler.backends import ray_gang
from scheduler.backends.base import Exit, GPUInfo, GpuSharing, Handle, Launch, NodeInfo
from scheduler.backends.mig import check_profile

NODE_LABEL = ray_gang.NODE_LABEL
DEFAULT_POOL = "ray"  # nodes that declare no accelerator type
ACCEL_PREFIX = "accelerator_type:"
MIG_PREFIX = "mig-"  # a node's custom resource per MIG profile: "mig-1g.10gb"
STDOUT, STDERR = "stdout.log", "stderr.log"
SIGTERM_CODE = -15  # a stopped Ray job reads like a process ended by SIGTERM
ENDED = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
# Ray's own variables in a job's env would confuse its driver; CUDA_VISIBLE_DEVICES is Ray's to set.
RESERVED_ENV = ("CUDA_VISIBLE_DEVICES", "RAY_ADDRESS")
STOP_MARGIN_S = 5.0  # beyond grace_s before Ray kills a stopping job's driver: its own cancel and log flush


def submission_id(job_id: str, attempt: int) -> str:
    return f"corral-{job_id}-{attempt}"


def resolve_token(token: str | None) -> str | None:
    """Ray's auth token: the one configured, else where Ray itself looks (RAY_AUTH_TOKEN, the file named by
    RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token); None when there is none (a cluster with auth disabled)."""
    if token:
        return token
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"]
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None


def auth_headers(token: str | None) -> dict[str, str]:
    # Ray's dashboard checks "Authorization: Bearer <token>" on every request when RAY_AUTH_MODE=token. Sent
    # explicitly so it does not depend on RAY_AUTH_MODE being set in Corral's own environment.
    found = resolve_token(token)
    return {"Authorization": f"Bearer {found}"} if found else {}


def discover_ray(address: str, token: str | None = None, timeout_s: float = 30.0) -> list[NodeInfo]:
    """The cluster's alive nodes with GPUs, named by their Ray node id (what the executor pins jobs with)."""
    r = httpx.get(
        f"{address.rstrip('/')}/api/v0/nodes",
        params={"detail": "1", "limit": "10000"},
        headers=auth_headers(token),
        timeout=timeout_s,
    )
    if r.status_code in (401, 403):
        raise PermissionError(f"Ray at {address} refused Corral's token ({r.status_code}): set ray_token")
    r.raise_for_status()
    found: list[NodeInfo] = []
    for n in r.json()["data"]["result"]["result"]:
        res: dict[str, float] = n.get("resources_total") or {}
        n_gpus = int(res.get("GPU", 0))
        mig = _mig_resources(res)
        if n.get("state") != "ALIVE" or (n_gpus == 0 and not mig):
            continue  # GPU-less nodes (often the head) still run Ray's drivers, but Corral has nothing to place
        accel = next((k[len(ACCEL_PREFIX) :] for k in sorted(res) if k.startswith(ACCEL_PREFIX)), None)
        memory = res.get("memory")
        found.append(
            NodeInfo(
                name=n["node_id"],
                pool=accel or DEFAULT_POOL,
                gpus=[GPUInfo(i, accel or "unknown") for i in range(n_gpus)],
                cpus=res.get("CPU"),
                memory_gb=round(memory / 2**30, 2) if memory else None,
                address=n.get("node_ip"),
                sharing=GpuSharing("GPU", 1, mig) if mig else None,
            )
        )
    return sorted(found, key=lambda n: (n.pool, n.address or "", n.name))


def _mig_resources(res: dict[str, float]) -> dict[str, int]:
    """MIG slices a Ray node declares as custom resources ("mig-1g.10gb": 7), by profile."""
    out: dict[str, int] = {}
    for key, value in res.items():
        if key.startswith(MIG_PREFIX) and value >= 1:
            try:
                out[check_profile(key.removeprefix(MIG_PREFIX))] = int(value)
            except ValueError:
                continue  # another custom resource that happens to start so
    return dict(sorted(out.items()))


@dataclass
class _Attempt:
    job_id: str
    attempt: int
    stopping: bool = False


class RayExecutor:
    """The Executor for a Ray cluster: attempts are Ray jobs; Ray, not this object, remembers them."""

    def __init__(
        self,
        address: str,
        cache_dir: Path,
        token: str | None = None,
        nodes: list[NodeInfo] | None = None,
        ready_timeout_s: float = 120.0,
        grace_s: float = 30.0,
    ) -> None:
        self.address = address.rstrip("/")
        self.grace_s = grace_s  # a job's time from SIGTERM to SIGKILL; Ray takes it per job, at submission
        self.cache_dir = Path(cache_dir)
        self.token = token
        self.addresses = {n.name: n.address for n in nodes or []}  # node id -> IP, for a gang's MASTER_ADDR
        self.ready_timeout_s = ready_timeout_s
        self._client: JobSubmissionClient | None = None
        self._attempts: dict[tuple[str, int], _Attempt] = {}

    @property
    def client(self) -> JobSubmissionClient:
        # Made on first use: the constructor talks to the cluster, which may come up after Corral.
        if self._client is None:
            self._client = JobSubmissionClient(self.address, headers=auth_headers(self.token))
        return self._client

    def launch(self, launch: Launch) -> Handle:
        sid = submission_id(launch.job_id, launch.attempt)
        workers = _workers(launch)
        env = {k: v for k, v in launch.env.items() if k not in RESERVED_ENV}
        env.update(CORRAL_JOB_ID=launch.job_id, CORRAL_ATTEMPT=str(launch.attempt))
        # Ray folds identical lines of several workers into "[repeated Nx across cluster]" in the driver's output,
        # which is the job's log: a user's log keeps every line unless the job asks otherwise.
        env.setdefault("RAY_DEDUP_LOGS", "0")
        # Ray's stop_job SIGKILLs a job's driver RAY_JOB_STOP_WAIT_TIME_S (3 by default) after its SIGTERM, read from
        # the job's own environment: give every rank the service's grace, and the gang's driver time to wait it out.
        env[ray_gang.GRACE_ENV] = str(self.grace_s)
        env["RAY_JOB_STOP_WAIT_TIME_S"] = str(math.ceil(self.grace_s + STOP_MARGIN_S))
        metadata = {
            "corral_job": launch.job_id,
            "corral_attempt": str(launch.attempt),
            "queue": env.get("CORRAL_QUEUE", ""),
            "owner": env.get("CORRAL_OWNER", ""),
        }
        kwargs: dict[str, Any]
        if len(workers) == 1:
            node, n_gpus = workers[0]
            line = _shell_line(launch)
            kwargs = dict(
                entrypoint=f"cd {shlex.quote(launch.workdir)} && {line}" if launch.workdir else line,
                # A share of one GPU: Ray's fractional GPUs (see the module's docstring).
                entrypoint_num_gpus=launch.gpu_fraction if launch.gpu_fraction is not None else n_gpus,
                entrypoint_label_selector={NODE_LABEL: node},
                runtime_env={"env_vars": env},
            )
            if launch.mig is not None:
                kwargs["entrypoint_resources"] = {MIG_PREFIX + launch.mig: 1}
        elif launch.gpu_fraction is not None or launch.mig is not None:
            raise OSError(f"job {launch.job_id}: a share of a GPU or a MIG slice is for one worker")
        else:
            spec = {
                "argv": _argv(launch),
                "env": env,
                "cwd": launch.workdir,
                "workers": [{"node": node, "gpus": n} for node, n in workers],
                # Everything on one node: STRICT_PACK (all bundles on that node or none); else PACK, with each
                # bundle's label naming its node.
                "strategy": "STRICT_PACK" if len({node for node, _ in workers}) == 1 else "PACK",
                "master_addr": self.addresses.get(workers[0][0]),
                "ready_timeout_s": self.ready_timeout_s,
            }
            kwargs = dict(
                entrypoint=f"python {Path(ray_gang.__file__).name} {ray_gang.encode(spec)}",
                runtime_env={"env_vars": env, "working_dir": str(self._gang_dir())},
            )
        try:
            self.client.submit_job(submission_id=sid, metadata=metadata, **kwargs)
        except RuntimeError as e:
            if self._status(sid) is None:  # a real failure; the service records it as launch_failed
                raise OSError(f"Ray refused job {sid}: {e}") from e
            # Submitted before a crash, or by a retried call: the job exists, so this attempt runs. Keep it.
        self._attempts[(launch.job_id, launch.attempt)] = _Attempt(launch.job_id, launch.attempt)
        return Handle(launch.job_id, launch.attempt, None, 0.0)

    def _gang_dir(self) -> Path:
        # A directory holding only ray_gang.py, uploaded as the gang's working_dir (Ray caches it by content).
        d = self.cache_dir / "gang"
        target = d / Path(ray_gang.__file__).name
        src = Path(ray_gang.__file__).read_bytes()
        if not target.exists() or target.read_bytes() != src:
            d.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ray_gang.__file__, target)
        return d

    def terminate(self, job_id: str, attempt: int, grace_s: float, now: float) -> None:
        # Ray sends SIGTERM, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S, which launch() set from the executor's
        # grace_s (the service's): a per-call grace_s cannot change it any more.
        a = self._attempts.get((job_id, attempt))
        if a is None:
            return
        a.stopping = True
        with contextlib.suppress(RuntimeError):  # already gone: poll reports it
            self.client.stop_job(submission_id(job_id, attempt))

    def poll(self, now: float) -> list[Exit]:
        ended: list[Exit] = []
        for key, a in list(self._attempts.items()):
            info = self._info(submission_id(a.job_id, a.attempt))
            if info is None:
                ended.append(Exit(a.job_id, a.attempt, None, "vanished from Ray"))
            elif info.status in ENDED:
                ended.append(_exit(a.job_id, a.attempt, info, "stopped by Corral" if a.stopping else ""))
            else:
                continue
            del self._attempts[key]
        return ended

    def adopt(self, handle: Handle) -> Exit | None:
        info = self._info(submission_id(handle.job_id, handle.attempt))
        if info is None:
            return Exit(handle.job_id, handle.attempt, None, "vanished while Corral was down")
        if info.status in ENDED:
            return _exit(handle.job_id, handle.attempt, info, "ended while Corral was down")
        self._attempts[(handle.job_id, handle.attempt)] = _Attempt(handle.job_id, handle.attempt)
        return None

    def logs(self, job_id: str, attempt: int) -> tuple[str, str]:
        """Ray's log of the job (stdout and stderr merged), mirrored into files refreshed on each call."""
        d = self.cache_dir / "logs" / submission_id(job_id, attempt)
        d.mkdir(parents=True, exist_ok=True)
        out, err = d / STDOUT, d / STDERR
        try:
            text = self.client.get_job_logs(submission_id(job_id, attempt))
        except RuntimeError:
            text = None  # not known to Ray (yet, or any more): keep what was mirrored before
        if text is not None:
            tmp = d / (STDOUT + ".tmp")
            tmp.write_text(text)
            tmp.replace(out)  # readers never see a half-written file
        out.touch()
        err.touch()
        return str(out), str(err)

    def alive(self, job_id: str, attempt: int) -> bool:
        if (job_id, attempt) not in self._attempts:
            return False
        if (self.cache_dir / "logs" / submission_id(job_id, attempt) / STDOUT).exists():
            # Someone reads this attempt's logs (the API's follow asks alive() between reads of the file):
            # refresh the mirror so what they read keeps growing.
            self.logs(job_id, attempt)
        status = self._status(submission_id(job_id, attempt))
        return status is not None and status not in ENDED

    def _info(self, sid: str) -> Any:
        """Ray's JobDetails for a submission, or None when Ray does not know it (404)."""
        try:
            return self.client.get_job_info(sid)
        except RuntimeError as e:
            if "404" in str(e) or "does not exist" in str(e):
                return None
            raise  # Ray unreachable or erroring: say nothing rather than report a live job as vanished

    def _status(self, sid: str) -> JobStatus | None:
        info = self._info(sid)
        return None if info is None else info.status


def _exit(job_id: str, attempt: int, info: Any, detail: str) -> Exit:
    if info.status == JobStatus.SUCCEEDED:
        return Exit(job_id, attempt, 0, detail)
    if info.status == JobStatus.STOPPED:
        return Exit(job_id, attempt, SIGTERM_CODE, detail or "stopped in Ray")
    code = info.driver_exit_code
    # Ray's message repeats the log's tail; its first line says what happened.
    why = (info.message or "failed in Ray").strip().splitlines()[0].split(", last available logs")[0]
    if code is None or code == 0:
        code = 1  # failed before the driver ran (bad runtime_env, node lost): no code of its own
    elif code == ray_gang.UNPLACED:
        why = "the gang's placement group was not ready in time"
    return Exit(job_id, attempt, code, f"{detail}: {why}" if detail else why)


def _workers(launch: Launch) -> list[tuple[str, int]]:
    """(node, GPUs) per worker. Launch.gpus merges the workers a node holds; CORRAL_WORKERS (when the service sets
    it) splits them again into equal workers; without it, each node runs one worker with all its GPUs there."""
    per_node = [(node, len(gpus)) for node, gpus in launch.gpus.items()]
    if not per_node:
        raise ValueError(f"job {launch.job_id}: no node to run on")
    n_workers, total = int(launch.env.get("CORRAL_WORKERS") or 0), sum(n for _, n in per_node)
    if n_workers > len(per_node) and total and total % n_workers == 0:
        each = total // n_workers
        split = [(node, each) for node, n in per_node for _ in range(n // each)]
        if len(split) == n_workers:
            return split
    return per_node


def _argv(launch: Launch) -> list[str]:
    command = launch.command
    if isinstance(command, str) or len(command) == 1:  # one string is a shell command line, as locally
        line = command if isinstance(command, str) else command[0]
        if not line.strip():
            raise ValueError(f"job {launch.job_id}: empty command")
        return ["/bin/sh", "-c", line]
    if not command:
        raise ValueError(f"job {launch.job_id}: empty command")
    return list(command)


def _shell_line(launch: Launch) -> str:
    # The Jobs API runs its entrypoint with a shell; exec so signals reach the command, not a waiting shell.
    return "exec " + shlex.join(_argv(launch))
