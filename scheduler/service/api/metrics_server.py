"""/metrics on a port of its own (setting metrics_port): Prometheus reaches it, the API's users need not.

A small threaded HTTP server beside uvicorn, serving the same registry as the API's /metrics did. It answers
/metrics only (anything else: 404), never reads a request body, and takes no token: who may reach the port is the
network's business (the chart's NetworkPolicy lets the Prometheus selector in).
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


class MetricsServer:
    """Serves GET /metrics of `registry` on host:port until close()."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
                if self.path.split("?")[0] != "/metrics":
                    self._answer(404, b"not found\n", "text/plain; charset=utf-8")
                    return
                self._answer(200, generate_latest(registry), CONTENT_TYPE_LATEST)

            def _answer(self, status: int, body: bytes, kind: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the standard library's name)
                pass  # a scrape every 30 s is not worth a log line

        ThreadingHTTPServer.daemon_threads = True
        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="corral-metrics", daemon=True)

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)
