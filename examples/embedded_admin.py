"""Embedding the primary in an application with its own admin endpoints.

    python examples/embedded_admin.py --bind 127.0.0.1:9003 --admin 127.0.0.1:9004
    curl http://127.0.0.1:9004/workers          # the application's own view
    curl -X POST http://127.0.0.1:9004/reload   # a rolling restart, from the app

The application owns the process: it builds a ``dispatch.Server``, starts its
admin HTTP server from the ``on_starting`` hook (in a thread of the primary),
keeps a history of worker exits through ``on_worker_exit``, and asks for
rolling restarts with ``server.reload()``, which is safe from any thread.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import dispatch

EXITS: list[dict] = []
RELOADS: list[float] = []


def hello(conn, addr) -> None:
    conn.recv(65536)
    body = f"hello from worker pid {os.getpid()}\n".encode()
    conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


def admin_server(server: dispatch.Server, address: str) -> ThreadingHTTPServer:
    class Admin(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/workers":
                return self.send_error(404)
            workers = [{"id": w.worker_id, "pid": w.pid, "state": w.state}
                       for w in list(server.workers.values())]
            self._json({"workers": workers, "exits": EXITS, "reloads": len(RELOADS)})

        def do_POST(self) -> None:
            if self.path != "/reload":
                return self.send_error(404)
            server.reload()
            self._json({"reload": "requested"})

        def _json(self, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    host, _, port = address.rpartition(":")
    return ThreadingHTTPServer((host, int(port)), Admin)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bind", default="127.0.0.1:9003")
    parser.add_argument("--admin", default="127.0.0.1:9004")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    def on_starting(server: dispatch.Server) -> None:
        admin = admin_server(server, args.admin)
        print(f"admin endpoints on {admin.server_address[0]}:{admin.server_address[1]}", flush=True)
        threading.Thread(target=admin.serve_forever, daemon=True).start()

    def on_worker_exit(worker_id: int, pid: int, how: str) -> None:
        EXITS.append({"id": worker_id, "pid": pid, "how": how})

    server = dispatch.Server(
        hello, workers=args.workers, bind=args.bind, on_starting=on_starting,
        on_worker_exit=on_worker_exit, on_reload=lambda s: RELOADS.append(1),
    )
    dispatch.configure_logging()
    server.start(install_signal_handlers=True)
    raise SystemExit(server.serve_forever())


if __name__ == "__main__":
    main()
