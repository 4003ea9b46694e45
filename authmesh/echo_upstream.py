"""A tiny HTTP service with no authmesh code: it answers every request with the headers it received.

It stands for any service behind Envoy, in any language: it trusts the gateway and reads the caller's
identity from the ``x-authmesh-*`` headers the gateway sets. Only the standard library is used, on
purpose: docker-compose.yml runs this file alone (``python -I echo_upstream.py --host 0.0.0.0 --port
N``) in a plain Python image. Run it with ``python -m authmesh.echo_upstream --port N`` (binds 127.0.0.1
unless ``--host`` says otherwise).
"""

from __future__ import annotations

import argparse
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOOPBACK = "127.0.0.1"


class EchoHandler(BaseHTTPRequestHandler):
    """Answers 200 with ``{"method", "path", "headers"}`` (header names lower-cased)."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # the name http.server dispatches to
        self._echo()

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        self.rfile.read(min(length, 1 << 20))
        self._echo()

    def _echo(self) -> None:
        headers: dict[str, list[str]] = {}
        for name, value in self.headers.items():
            headers.setdefault(name.lower(), []).append(value)
        body = json.dumps({"method": self.command, "path": self.path, "headers": headers}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # the base class's name
        """Quiet: one line per request would drown the stack's own logs."""


def main() -> None:
    """Serve until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default=LOOPBACK, help="the address to bind (default: %(default)s)")
    args = parser.parse_args()
    with ThreadingHTTPServer((args.host, args.port), EchoHandler) as server:
        server.daemon_threads = True
        server.serve_forever()


if __name__ == "__main__":
    main()
