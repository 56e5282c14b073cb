"""The binding webhook: the HTTPS endpoint the Kubernetes API server asks before another scheduler binds a pod (a
ValidatingWebhookConfiguration on pods/binding, which the chart installs), so that nothing lands on one of Corral's
nodes without room beside Corral's jobs (outside.admit_binding decides).

A small threaded server of its own, not the API's: the API server reaches it with the chart's certificate, and it
answers nothing but POST /bind/<path token> with an AdmissionReview. The token (a random file beside the certificate,
in the webhook's configuration too) keeps other callers out: one who could call it could make Corral count, for 30 s
at a time, a pending pod on a node it will never land on.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scheduler.service.core.outside import admit_binding

if TYPE_CHECKING:
    from scheduler.service.core.loop import Core

log = logging.getLogger("corral.service")
PATH = "/bind"
MAX_BODY = 64 * 1024  # an AdmissionReview of a Binding is about 1 KiB
TIMEOUT_S = 10.0  # the API server gives a webhook 5 s (the chart's timeoutSeconds)


def answer(core: Core, review: Any) -> dict[str, Any]:
    """The AdmissionReview answer to one review: allowed, or refused with why (the scheduler's event shows it)."""
    req = review.get("request") if isinstance(review, dict) else None
    if not isinstance(req, dict) or not isinstance(req.get("uid"), str):
        raise ValueError("not an AdmissionReview (request.uid missing)")
    why: str | None = None
    obj = req.get("object") or {}
    target = (obj.get("target") or {}) if isinstance(obj, dict) else {}
    if req.get("operation") == "CREATE" and (req.get("kind") or {}).get("kind") == "Binding" and target.get("name"):
        namespace = req.get("namespace") or (obj.get("metadata") or {}).get("namespace") or ""
        pod = req.get("name") or (obj.get("metadata") or {}).get("name") or ""
        try:
            why = admit_binding(core, str(namespace), str(pod), str(target["name"]))
        except Exception as e:  # the pod could not be read: refuse, the scheduler tries again
            log.warning("binding %s/%s to %s: not checked (%s); refused for now", namespace, pod, target["name"], e)
            why = f"Corral could not check this bind yet ({type(e).__name__}); try again"
    response: dict[str, Any] = {"uid": req["uid"], "allowed": why is None}
    if why is not None:
        response["status"] = {"code": 403, "reason": "Forbidden", "message": why}
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}


class _TLSServer(ThreadingHTTPServer):
    """The TLS handshake in each connection's own thread, with a timeout: one client that connects and says nothing
    must not stop the accepting thread (and with it every bind check)."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], tls: ssl.SSLContext):
        super().__init__(address, handler)
        self.tls = tls

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(TIMEOUT_S)
        try:
            conn = self.tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            request.close()
            return
        self.RequestHandlerClass(conn, client_address, self)  # type: ignore[arg-type]  # typeshed wants Self


class BindingWebhook:
    """Serves PATH over HTTPS on `port` in daemon threads until close(). With a file `path-token` in `tls_dir` (the
    chart writes one beside the certificate), only PATH/<token> answers: the API server knows it from the webhook's
    configuration, a caller from elsewhere does not."""

    def __init__(self, core: Core, port: int, tls_dir: Path, host: str = "0.0.0.0") -> None:
        token_file = tls_dir / "path-token"
        path = f"{PATH}/{token_file.read_text().strip()}" if token_file.exists() else PATH
        handler = type("Handler", (_Handler,), {"core": core, "path_served": path})
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.minimum_version = ssl.TLSVersion.TLSv1_2
        tls.load_cert_chain(tls_dir / "tls.crt", tls_dir / "tls.key")
        self.server = _TLSServer((host, port), handler, tls)
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, name="corral-webhook", daemon=True)

    def start(self) -> BindingWebhook:
        self._thread.start()
        log.info("binding webhook on port %d", self.port)
        return self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Handler(BaseHTTPRequestHandler):
    core: Core
    path_served: str
    timeout = TIMEOUT_S  # a request that trickles in is cut off

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        size = int(self.headers.get("Content-Length") or 0)
        if not 0 < size <= MAX_BODY:
            self.close_connection = True
            return self._send(413 if size else 400, {"message": f"a body of 1 to {MAX_BODY} bytes"})
        body = self.rfile.read(size)  # read before any answer: unread bytes would reset the connection
        if self.path.split("?")[0] != self.path_served:
            return self._send(404, {"message": "not found"})
        try:
            out = answer(self.core, json.loads(body))
        except ValueError as e:  # bad JSON too
            return self._send(400, {"message": str(e)})
        self._send(200, out)

    def _send(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's name)
        log.debug("webhook: " + format, *args)
