"""High availability put together from settings (docs/kubernetes.md, "High availability"): the fence for the
database, the Lease on Kubernetes, and the leadership wired into the core, its executor and the app.

On PostgreSQL any number of instances may run: one leads (schedules, binds, records decisions), the others forward
requests to it and take over when it goes. On SQLite exactly one may: a second refuses to start.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from pathlib import Path

import sqlalchemy as sa

from scheduler.service.core.leader import Leadership, PostgresFence, SqliteFence, identity
from scheduler.service.core.loop import Core
from scheduler.service.core.settings import ServiceSettings

log = logging.getLogger("corral.service")
SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
LOST_EXIT = 3  # the process's exit code when it lost the lead: its supervisor starts it again, as a follower


class AlreadyRunning(RuntimeError):
    """Another instance holds this SQLite database."""


def own_url(settings: ServiceSettings) -> str:
    if settings.advertise_url:
        return settings.advertise_url
    host = socket.gethostname() if settings.host in ("0.0.0.0", "::") else settings.host
    return f"{'https' if settings.tls_certfile else 'http'}://{host}:{settings.port}"


def lease_namespace(settings: ServiceSettings) -> str:
    if settings.k8s_lease_namespace:
        return settings.k8s_lease_namespace
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    return SA_NAMESPACE.read_text().strip() if SA_NAMESPACE.exists() else "default"


def single(settings: ServiceSettings) -> SqliteFence | None:
    """On SQLite: this instance's hold on the database (AlreadyRunning if another has it); None on PostgreSQL."""
    url = sa.engine.make_url(settings.url)
    if url.get_backend_name() != "sqlite":
        return None
    database = Path(url.database or settings.data_dir / "corral.db")
    database.parent.mkdir(parents=True, exist_ok=True)
    fence = SqliteFence(str(database))
    if not fence.try_acquire():
        raise AlreadyRunning(
            f"another Corral instance uses the SQLite database {url.database} ({fence.path} is "
            "locked): one instance per SQLite database; run several on PostgreSQL"
        )
    return fence


def elect(settings: ServiceSettings, core: Core) -> Leadership:
    """The leadership of a core built without starting (PostgreSQL): a Lease too on backend kubernetes; the executor
    checks it before every bind. Losing the lead ends the process (exit code LOST_EXIT)."""
    me = identity()
    fence = PostgresFence(settings.url, me, own_url(settings))
    lease = None
    api = getattr(core.executor, "core", None)  # the Kubernetes executor's CoreV1Api
    if settings.backend == "kubernetes" and api is not None:
        from scheduler.backends.kubernetes.lease import Lease  # noqa: PLC0415 (the kubernetes client: this backend only)

        lease = Lease(api.api_client, lease_namespace(settings), settings.k8s_lease_name, me, settings.lease_s)
    leadership = Leadership(fence, lease, settings.leader_retry_s, settings.renew_deadline_s, on_lost=_exit)
    core.leadership = leadership
    if hasattr(core.executor, "before_bind"):
        core.executor.before_bind = leadership.check_bind
    return leadership


def lead_then_run(core: Core, leadership: Leadership, stop: threading.Event) -> None:
    """The scheduling thread of an instance among several: wait to lead, take over (recover what ran, rebuild the
    engine from the database), then schedule until stopped."""
    while not stop.is_set() and not leadership.leading.wait(0.5):
        pass
    if stop.is_set():
        return
    log.info("leading: taking over the cluster")
    try:
        core.start()
    except Exception:  # holding the lead without scheduling would keep every other replica from taking over
        log.exception("taking over failed")
        _exit()
    core.run(stop)


def _exit() -> None:
    log.critical("this instance lost the lead; exiting so that it starts again as a follower")
    logging.shutdown()
    os._exit(LOST_EXIT)
