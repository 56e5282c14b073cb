"""Two or more `corral serve` processes on one PostgreSQL database and the test control plane, as the chart runs its
replicas (kwok runs no containers, so they run here as processes, authenticated with the chart's ServiceAccount
token), and a TCP relay that can cut one of them off from the API server or the database."""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import yaml

from scheduler.service.api.auth import Role, digest, new_secret
from scheduler.service.store.db import migrate, tokens
from tests.k8s_kit import CORRAL_NS, ControlPlane, free_port


class Relay:
    """Forwards 127.0.0.1:port to `target`; cut() closes every connection and refuses new ones."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.open = True
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while self.open:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self.lock:
                if not self.open:
                    client.close()
                    upstream.close()
                    return
                self.conns += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        # epoll, not select(): in a long test run this process holds over 1,024 descriptors, which select() refuses.
        with contextlib.suppress(OSError, ValueError), selectors.DefaultSelector() as sel:
            sel.register(a, selectors.EVENT_READ)
            sel.register(b, selectors.EVENT_READ)
            while self.open:
                for key, _ in sel.select(0.5):
                    s = key.fileobj
                    assert isinstance(s, socket.socket)
                    data = s.recv(65536)
                    if not data:
                        return
                    (b if s is a else a).sendall(data)

    def cut(self) -> None:
        """A network partition: nothing gets through any more (connections are closed, new ones refused)."""
        with self.lock:
            self.open = False
            self.server.close()
            for c in self.conns:
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_RDWR)
                    c.close()


def token_kubeconfig(plane: ControlPlane, path: Path, server: str | None = None) -> Path:
    """A kubeconfig for Corral's ServiceAccount (the chart's), at `server` (default: the API server itself)."""
    api = plane.corral_client()
    conf = api.configuration
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "corral",
        "clusters": [
            {
                "name": "test",
                "cluster": {
                    "server": server or conf.host,
                    "certificate-authority": conf.ssl_ca_cert,
                    "tls-server-name": "localhost",
                },
            }
        ],
        "users": [{"name": "corral", "user": {"token": conf.api_key["authorization"].split(" ", 1)[1]}}],
        "contexts": [{"name": "corral", "context": {"cluster": "test", "user": "corral"}}],
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def admin_token(url: str) -> str:
    """A platform admin's token in a fresh database (migrated to head)."""
    migrate(url)
    secret = new_secret()
    with sa.create_engine(url).begin() as conn:
        conn.execute(
            tokens.insert().values(
                digest=digest(secret),
                user="admin",
                role=Role.PLATFORM_ADMIN.value,
                scope=None,
                created_at=time.time(),
                created_by="test",
                revoked=False,
            )
        )
    return secret


@dataclass
class Replica:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ready(self) -> dict[str, Any]:
        try:
            with urllib.request.urlopen(self.url + "/readyz", timeout=3) as r:
                out: dict[str, Any] = json.loads(r.read())
                return out
        except urllib.error.HTTPError as e:
            body: dict[str, Any] = json.loads(e.read() or b"{}")
            return body
        except OSError:
            return {}

    def role(self) -> str | None:
        return self.ready().get("role")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


@dataclass
class Replicas:
    """The replicas of one test; stop() ends those still running."""

    base_env: dict[str, str]
    root: Path
    all: list[Replica] = field(default_factory=list)

    def start(self, name: str, **env: str) -> Replica:
        port = free_port()
        data = self.root / name
        data.mkdir(parents=True)
        log = self.root / f"{name}.log"
        full = {
            **os.environ,
            **self.base_env,
            "CORRAL_PORT": str(port),
            "CORRAL_HOST": "127.0.0.1",
            "CORRAL_DATA_DIR": str(data),
            "CORRAL_ADVERTISE_URL": f"http://127.0.0.1:{port}",
            "PYTHONUNBUFFERED": "1",
            **env,
        }  # its log as it goes: what a failed test shows
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [str(Path(sys.executable).parent / "corral"), "serve"], env=full, stdout=out, stderr=subprocess.STDOUT
            )
        r = Replica(name, port, proc, log)
        self.all.append(r)
        return r

    def stop(self) -> None:
        for r in self.all:
            if r.proc.poll() is None:
                r.proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    r.proc.wait(15)
            if r.proc.poll() is None:
                r.kill()


def base_env(plane: ControlPlane, kubeconfig: Path, db_url: str, tag: str) -> dict[str, str]:
    return {
        "CORRAL_BACKEND": "kubernetes",
        "CORRAL_K8S_KUBECONFIG": str(kubeconfig),
        "CORRAL_DATABASE_URL": db_url,
        "CORRAL_K8S_NODE_SELECTOR": f"corral.dev/test={tag}",
        "CORRAL_K8S_NAMESPACE_PREFIX": f"h{tag}-",
        "CORRAL_K8S_DEFAULT_IMAGE": "busybox:1.36",
        "CORRAL_K8S_FOREIGN_PODS": "false",
        "CORRAL_K8S_LEASE_NAMESPACE": CORRAL_NS,
        "CORRAL_K8S_LEASE_NAME": "corral-leader",
        "CORRAL_LEASE_S": "12",
        "CORRAL_RENEW_DEADLINE_S": "8",
        "CORRAL_LEADER_RETRY_S": "2",
        "CORRAL_TICK_S": "0.5",
        "CORRAL_GRACE_S": "0",
        "CORRAL_LOG_LEVEL": "info",
    }


def request(
    url: str, token: str, method: str = "GET", body: dict[str, Any] | None = None, timeout: float = 10
) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url, data=data, method=method, headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")
