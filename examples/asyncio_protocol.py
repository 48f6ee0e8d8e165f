"""A raw asyncio protocol served by dispatch: an echo server on every core.

    python examples/asyncio_protocol.py --bind 127.0.0.1:9000
    printf 'hello\\n' | nc -q1 127.0.0.1 9000

Any ``asyncio.Protocol`` runs unchanged: each worker hands its connections to
``loop.connect_accepted_socket(EchoProtocol, sock)``.
"""

from __future__ import annotations

import argparse
import asyncio
import os

import dispatch


class EchoProtocol(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        transport.write(f"echo from worker pid {os.getpid()}\n".encode())

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bind", default="127.0.0.1:9000")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    args = parser.parse_args()
    dispatch.serve(dispatch.AsyncioProtocol(EchoProtocol), workers=args.workers, bind=args.bind)


if __name__ == "__main__":
    main()
