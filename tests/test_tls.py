"""The API over HTTPS when a certificate and key are configured."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from scheduler.service.core.settings import ServiceSettings
from tests.test_crash import free_port


def test_cert_and_key_go_together(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="go together"):
        ServiceSettings(tls_certfile=tmp_path / "c.pem")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make a certificate")
@pytest.mark.integration
def test_serves_https(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    port = free_port()
    env = {
        **os.environ,
        "CORRAL_DATA_DIR": str(tmp_path / "data"),
        "CORRAL_PORT": str(port),
        "CORRAL_GPUS": "1",
        "CORRAL_TLS_CERTFILE": str(cert),
        "CORRAL_TLS_KEYFILE": str(key),
    }
    env.pop("CORRAL_DATABASE_URL", None)
    server = subprocess.Popen(
        [sys.executable, "-m", "scheduler.service"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        end = time.monotonic() + 30
        while True:
            try:
                r = httpx.get(f"https://127.0.0.1:{port}/healthz", verify=str(cert), timeout=2)
                break
            except httpx.HTTPError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.1)
        assert r.text == "ok"
        with pytest.raises(httpx.HTTPError):  # plain HTTP is not served on that port
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).raise_for_status()
    finally:
        server.terminate()
        server.wait(timeout=15)
