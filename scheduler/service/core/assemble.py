"""Put a service together from settings: database (migrated), this node's GPUs, the executor, the core, the app."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa
import uvicorn
from fastapi import FastAPI

from sandbox.nvml_samples import read_samples
from scheduler.backends.accounts import open_accounts, per_user, unreachable_ancestor
from scheduler.backends.base import Executor, GPUInfo, NodeInfo
from scheduler.backends.gpus import detect
from scheduler.backends.local import LocalExecutor
from scheduler.gc_tuning import tune_gc
from scheduler.service.api.app import create_app
from scheduler.service.api.auth import Role, digest, new_secret
from scheduler.service.api.metrics_server import MetricsServer
from scheduler.service.core import ha
from scheduler.service.core.loop import Core
from scheduler.service.core.settings import ADMIN_TOKEN_FILE, ServiceSettings
from scheduler.service.core.telemetry import configure_logging
from scheduler.service.store import rows as store
from scheduler.service.store.db import connect, migrate, require_head, tokens

if TYPE_CHECKING:
    from scheduler.backends.kubernetes.sandbox import NotebookStorage

log = logging.getLogger("corral.service")
# Said at every start on the Ray backend (docs/ray.md, Trust model): Corral cannot separate Ray jobs from each other.
RAY_TRUST = (
    "isolation: on the Ray backend every job runs as the Ray cluster's own user, with no isolation between "
    "jobs (each can read the others' files and environment, and use the cluster's credentials): use one "
    "Ray cluster per trust domain, for a single team or a group that trusts each other"
)


def build_core(
    settings: ServiceSettings,
    executor: Executor | None = None,
    gpus: list[GPUInfo] | None = None,
    clock: Callable[[], float] = time.time,
    nodes: list[NodeInfo] | None = None,
    start: bool = True,
) -> Core:
    """The core on the configured backend; `nodes` (tests) replaces what the backend would discover. Without
    `start`, the caller starts it (an instance among several, once it leads: ha.lead_then_run)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if settings.migrate_on_start:
        migrate(settings.url)
    else:
        require_head(settings.url)  # NotAtHead: `corral db upgrade` (the chart's hook) has not run
    protect_data(settings)
    if settings.backend == "ray":
        # Imported only for this backend: Ray takes seconds to import, which `corral serve` on the local
        # backend (and every test) should not pay.
        from scheduler.backends.ray import RayExecutor, discover_ray  # noqa: PLC0415

        if not settings.ray_address:
            raise ValueError("backend ray needs ray_address (the Ray dashboard / Jobs API URL)")
        log.warning(RAY_TRUST)
        # The cluster's GPU nodes are the pools; Ray, through its Jobs API, runs what Corral admits.
        if nodes is None:
            nodes = discover_ray(settings.ray_address, settings.ray_token)
        executor = executor or RayExecutor(
            settings.ray_address, settings.data_dir / "ray", settings.ray_token, nodes, grace_s=settings.grace_s
        )
    elif settings.backend == "kubernetes":
        # Imported only for this backend, like Ray: the kubernetes client is slow to import.
        from kubernetes import client as k8s_client  # noqa: PLC0415
        from kubernetes import config as k8s_config  # noqa: PLC0415

        from scheduler.backends.kubernetes.executor import KubernetesExecutor  # noqa: PLC0415

        if settings.k8s_kubeconfig:
            api = k8s_config.new_client_from_config(config_file=settings.k8s_kubeconfig)  # type: ignore[no-untyped-call]
        else:
            k8s_config.load_incluster_config()  # type: ignore[no-untyped-call]
            api = k8s_client.ApiClient()
        k8s_ex = KubernetesExecutor(
            api,
            settings.data_dir / "k8s",
            settings.k8s_default_image,
            settings.grace_s,
            settings.k8s_namespace_prefix,
            hub_namespace=settings.k8s_hub_namespace,
            node_selector=settings.k8s_node_selector,
            foreign_pods=settings.k8s_foreign_pods,
            workload=settings.k8s_workload,
            run_as_user=settings.k8s_run_as_user,
            managed_taint=settings.k8s_managed_taint,
            notebook_storage=notebook_storage(settings),
        )
        if nodes is None:
            nodes = k8s_ex.discover()  # its node watch resumes from this very list
        executor = executor or k8s_ex
    elif nodes is None:
        # Declared GPUs when --gpus is given, else what NVML finds, else none (a CPU-only machine).
        source = detect(settings.gpus, settings.gpu_model if settings.gpus is not None else None)
        found = source.gpus if gpus is None else gpus
        real = gpus is None and source.kind == "nvml" and bool(found)
        nodes = [
            NodeInfo(
                settings.node,
                settings.pool,
                found,
                settings.cpus,
                settings.memory_gb,
                sample=read_samples if real else None,
            )
        ]
    if executor is None:  # this machine's GPUs: their memory caps shares, their MIG instances are handed out
        executor = local_executor(settings, nodes[0].gpus if len(nodes) == 1 else None)
    core = Core(settings, connect(settings.url), executor, nodes, clock)
    if start:
        core.start()
    return core


def notebook_storage(settings: ServiceSettings) -> NotebookStorage | None:
    """Per-user notebook claims on Kubernetes, when a size is set."""
    if settings.k8s_notebook_storage_size is None:
        return None
    from scheduler.backends.kubernetes.sandbox import NotebookStorage  # noqa: PLC0415  (the kubernetes backend's)

    return NotebookStorage(
        settings.k8s_notebook_storage_size, settings.k8s_notebook_storage_class, settings.k8s_notebook_dir
    )


def local_executor(settings: ServiceSettings, gpus: list[GPUInfo] | None = None) -> LocalExecutor:
    """This machine's executor, running each job as its owner's account where the service can switch users."""
    users, why = isolation(settings)
    if not users:
        log.warning("isolation: %s", why)
        return LocalExecutor(settings.logs_dir, homes=settings.data_dir / "home", gpus=gpus)  # notebooks' homes
    log.info("isolation: %s (accounts: %s)", why, settings.accounts)
    blocked = unreachable_ancestor(settings.data_dir)
    if blocked is not None:  # jobs still start (in their output directory) but cannot name it by its path
        log.warning(
            "isolation: %s is closed to other users, so jobs cannot reach their output directories and "
            "homes under %s by path: put data_dir where every user may pass (e.g. /var/lib/corral)",
            blocked,
            settings.data_dir,
        )
    accounts = open_accounts(settings.accounts, settings.data_dir, settings.uid_min, settings.uid_max)
    return LocalExecutor(settings.logs_dir, accounts=accounts, gpus=gpus)


def isolation(settings: ServiceSettings) -> tuple[bool, str]:
    """Whether this service runs jobs as their users' own accounts, and why (ValueError: it was asked to and
    cannot). Only the local backend runs jobs on this machine."""
    if settings.backend != "local":
        return False, f"jobs run on backend {settings.backend}, not on this machine"
    return per_user(settings.run_as, os.geteuid())


def protect_data(settings: ServiceSettings) -> None:
    """Nobody else may read the database (its tokens and secrets) or list the data directory; jobs pass through
    data_dir to their own directories only. Also fixes the mode of files an older version left readable."""
    os.chmod(settings.data_dir, 0o711)
    url = sa.engine.make_url(settings.url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        for suffix in ("", "-wal", "-shm", "-journal"):  # SQLite gives its journals the database's mode
            path = Path(url.database + suffix)
            if path.exists():
                os.chmod(path, 0o600)


def build_app(settings: ServiceSettings, run_loop: bool = True) -> tuple[Core, FastAPI, bool]:
    """The core and its API; the flag says whether a bootstrap admin token was just written."""
    # Whatever the service writes (database, logs, run directories) is its own unless it says otherwise.
    os.umask(0o077)
    configure_logging(settings)
    hold = ha.single(settings)  # SQLite: this instance alone (a second refuses to start); None: PostgreSQL
    core = build_core(settings, start=hold is not None)
    if hold is None:  # any number of instances: one leads, the others forward to it (scheduler/service/core/ha.py)
        ha.elect(settings, core)
    made = bootstrap_admin(core, settings.data_dir / ADMIN_TOKEN_FILE) is not None
    app = create_app(core, run_loop, own_url=ha.own_url(settings))
    app.state.hold = hold  # kept open as long as the app lives
    return core, app, made


def create_token(core: Core, user: str, role: Role, scope: str | None = None, by: str = "corral") -> str:
    """A token made without the API (bootstrap, tests); returns its secret. `corral token create --local` is
    scheduler/service/core/local_tokens.py."""
    secret, now = new_secret(), core.clock()
    with core.db.begin() as conn:
        conn.execute(
            tokens.insert().values(
                digest=digest(secret),
                user=user,
                role=role.value,
                scope=scope,
                created_at=now,
                created_by=by,
                revoked=False,
            )
        )
        store.add_audit(conn, now, by, "token.create", f"token for {user}", role=role.value, scope=scope)
    return secret


def bootstrap_admin(core: Core, path: Path) -> str | None:
    """On a database with no tokens yet, make a platform-admin token and leave it (mode 0600) at `path`, where
    the CLI on this machine finds it. Returns the secret when one was made."""
    with core.db.connect() as conn:
        if conn.execute(sa.select(sa.func.count()).select_from(tokens)).scalar_one():
            return None
    secret = create_token(core, "admin", Role.PLATFORM_ADMIN)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    return secret


def serve(settings: ServiceSettings) -> None:
    """Run the API and the scheduling loop in this process until interrupted."""
    _, app, _ = build_app(settings)
    tune_gc()
    run_uvicorn(app, settings)


def run_uvicorn(app: FastAPI, settings: ServiceSettings) -> None:
    """Serve the API, over TLS when a certificate and key are configured."""
    # JSON logs: uvicorn's own records go through the handler of configure_logging. Its access lines never: the
    # middleware's (RequestTelemetry) carry the request id and the caller.
    log_config = None if settings.log_format == "json" else uvicorn.config.LOGGING_CONFIG
    # metrics_port: /metrics on a port of its own (the API's port answers 404 there; see app.py).
    metrics = None
    if settings.metrics_port is not None:
        metrics = MetricsServer(app.state.core.metrics.registry, settings.host, settings.metrics_port).start()
    try:
        uvicorn.run(
            app,
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            log_config=log_config,
            access_log=False,
            ssl_certfile=settings.tls_certfile,
            ssl_keyfile=settings.tls_keyfile,
        )
    finally:
        if metrics is not None:
            metrics.close()
