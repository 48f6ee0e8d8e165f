"""A line-based TCP service: each line comes back upper-cased; "quit" ends the session.

    python examples/line_service.py --bind 127.0.0.1:9001
    nc 127.0.0.1 9001

A plain handler in a pool of threads per worker: blocking code, no asyncio.
"""

from __future__ import annotations

import argparse
import os
import socket
from typing import Any

import dispatch


def handle(conn: socket.socket, addr: Any) -> None:
    conn.settimeout(60)  # an idle client does not hold a thread forever
    with conn.makefile("rwb") as stream:
        stream.write(f"ready, worker pid {os.getpid()}\n".encode())
        stream.flush()
        for line in stream:
            text = line.decode("utf-8", "replace").strip()
            if text == "quit":
                stream.write(b"bye\n")
                break
            stream.write(text.upper().encode() + b"\n")
            stream.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bind", default="127.0.0.1:9001")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()
    # The service greets first, so connections reach a thread before the client speaks.
    dispatch.serve(handle, workers=args.workers, bind=args.bind, threads=args.threads,
                   server_speaks_first=True)


if __name__ == "__main__":
    main()
