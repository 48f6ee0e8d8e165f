"""Soak: kill workers N times and check the primary leaks nothing.

    python -m benchmarks soak --restarts 2000

Starts ``python -m dispatch dispatch.demo:app`` on a free loopback port, then
SIGKILLs its oldest worker and waits for the replacement, N times. Prints the
primary's open descriptors and children (zombies counted) before and after,
and one request's answer at the end; exits 1 if any of them differ. Everything
it starts is stopped by pid. The server's log: /tmp/soak.log.
"""

from __future__ import annotations

import argparse

from benchmarks.workloads.soak import soak

HELP = "kill workers N times and check the primary leaks no descriptor or zombie"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--restarts", type=int, default=1000, help="workers to kill (default %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="worker processes (default %(default)s)")


def finish(args: argparse.Namespace, p: argparse.ArgumentParser, invocation: str) -> None:
    args.invocation = invocation


def execute(args: argparse.Namespace) -> int:
    return soak(args.restarts, args.workers)
