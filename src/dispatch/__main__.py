"""``python -m dispatch MODULE:ATTR [options]``: the CLI, one flag per ``serve()`` option."""

from __future__ import annotations

import argparse
import os
import ssl
import sys

from dispatch import __version__
from dispatch.balance import MODES
from dispatch.config import LOG_LEVELS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dispatch",
        description="Serve MODULE:ATTR on every core: one primary accepts, workers handle.",
        epilog="Signals: TERM/INT graceful stop, QUIT fast stop, HUP/USR2 rolling restart, "
        "TTIN/TTOU one worker more/less.",
    )
    parser.add_argument("handler", metavar="MODULE:ATTR", help="the handler, imported by each worker")
    parser.add_argument("--version", action="version", version=f"dispatch {__version__}")
    parser.add_argument("-w", "--workers", type=int, default=os.cpu_count() or 1,
                        help="worker processes (default: %(default)s, the CPU count)")
    parser.add_argument("-b", "--bind", action="append", metavar="ADDRESS",
                        help="HOST:PORT, [IPV6]:PORT or unix:PATH; repeatable (default: 127.0.0.1:8000)")
    parser.add_argument("--balance", choices=MODES, default="round-robin",
                        help="how connections reach workers (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads per worker for plain (non-async) handlers (default: %(default)s)")
    parser.add_argument("--max-connections", type=int, default=0,
                        help="connections a worker with a coroutine or protocol handler takes at once; "
                        "0 = no limit (default)")
    parser.add_argument("--client-timeout", type=float, default=5.0,
                        help="seconds a client may stay silent: before its first bytes, and in each "
                        "blocking call of a plain handler; 0 = off (default: %(default)s)")
    parser.add_argument("--server-speaks-first", action="store_true",
                        help="give plain handlers connections before the client has sent anything "
                        "(protocols that greet first: SMTP, FTP, banners)")
    parser.add_argument("--backlog", type=int, default=2048, help="listen backlog (default: %(default)s)")
    parser.add_argument("--accept-batch", type=int, default=256,
                        help="most connections the primary accepts per wakeup (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="seconds without a heartbeat before a worker is killed (default: %(default)s)")
    parser.add_argument("--graceful-timeout", type=float, default=30.0,
                        help="seconds a draining worker may take to finish (default: %(default)s)")
    parser.add_argument("--boot-timeout", type=float, default=30.0,
                        help="seconds a new worker may take to become ready (default: %(default)s)")
    parser.add_argument("--max-requests", type=int, default=0,
                        help="recycle a worker after this many connections; 0 = never (default)")
    parser.add_argument("--max-requests-jitter", type=int, default=0,
                        help="add up to this many to max-requests per worker (default: 0)")
    parser.add_argument("--max-memory", type=int, default=0,
                        help="recycle a worker whose RSS exceeds this many bytes; 0 = never (default)")
    parser.add_argument("--restart-batch", type=int, default=1,
                        help="workers replaced at once in a rolling restart (default: %(default)s)")
    parser.add_argument("--health", metavar="HOST:PORT",
                        help="serve /cluster-health, /metrics, /healthz, /readyz here")
    parser.add_argument("--pidfile", metavar="PATH", help="write the primary's pid here")
    parser.add_argument("--preload", action="store_true",
                        help="import the handler once in the primary (faster forks, no code reload)")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    parser.add_argument("--user", help="run workers as this user (the primary binds first, as root)")
    parser.add_argument("--group", help="run workers as this group (default: the user's group)")
    parser.add_argument("--certfile", help="TLS certificate chain (PEM); the handshake runs in the worker")
    parser.add_argument("--keyfile", help="TLS private key (PEM), if not in --certfile")
    return parser


def _tls_context(certfile: str | None, keyfile: str | None) -> ssl.SSLContext | None:
    if certfile is None:
        if keyfile is not None:
            raise ValueError("--keyfile needs --certfile")
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot load TLS certificate {certfile}: {exc}") from None
    return context


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # As with `python -m`, the current directory is importable (workers inherit sys.path).
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    from dispatch import BindError, BootError, PidfileError, Server, configure_logging

    options = vars(args).copy()
    handler = options.pop("handler")
    options["bind"] = options["bind"] or ["127.0.0.1:8000"]
    try:
        options["ssl"] = _tls_context(options.pop("certfile"), options.pop("keyfile"))
        server = Server(handler, **options)
    except (TypeError, ValueError) as exc:
        print(f"dispatch: error: {exc}", file=sys.stderr)
        return 2
    configure_logging(server.config.log_level)
    try:
        server.start(install_signal_handlers=True)
    except (BindError, PidfileError) as exc:
        print(f"dispatch: error: {exc}", file=sys.stderr)
        return 1
    code = server.serve_forever()
    if code:
        print(f"dispatch: error: {BootError.__doc__}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
