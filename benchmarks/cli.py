"""Benchmarks of dispatch: the balance modes next to the peers, failures and restarts under
load, attacks on a live server, a restart soak. Run from the repository's root.

    python -m benchmarks run --quick          # the balance modes next to the peers, about 2 minutes
    python -m benchmarks openloop             # fast-request latency at fixed arrival rates (h2load)
    python -m benchmarks failures --quick     # workers killed, rolling restarts, about 3 minutes
    python -m benchmarks abuse --only NAME    # attacks on a live server (as root)
    python -m benchmarks soak --restarts 2000 # kill workers N times, check nothing leaks

The old script paths (benchmarks/run.py, failures.py, abuse.py, soak_restarts.py) run
the same commands. TERM, INT and HUP end a command through its ``finally`` blocks,
which stop every server it started.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
from collections.abc import Sequence
from types import ModuleType

from benchmarks.commands import abuse, failures, openloop, run, soak

COMMANDS: dict[str, ModuleType] = {"run": run, "openloop": openloop, "failures": failures, "abuse": abuse,
                                   "soak": soak}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    top = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0],
                                  epilog="python -m benchmarks COMMAND --help: the options of COMMAND")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parsers = {}
    for name, module in COMMANDS.items():
        parsers[name] = sub.add_parser(name, help=module.HELP, description=module.__doc__,
                                       formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(parsers[name])
    return top, parsers


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop the servers


def main(argv: Sequence[str] | None = None, script: str | None = None) -> int:
    """Run one command. ``script``: the old path the command was started as (its reports name
    the command line as typed, e.g. ``python benchmarks/run.py --quick``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    top, parsers = build_parser()
    if script is not None and argv and argv[0] in parsers:
        parsers[argv[0]].prog = f"python {script}"
    args = top.parse_args(argv)
    name = vars(args).pop("command")
    typed = ["python", script, *argv[1:]] if script is not None else ["python", "-m", "benchmarks", *argv]
    COMMANDS[name].finish(args, parsers[name], shlex.join(typed))
    # A shell's background job starts with SIGINT ignored; make TERM, INT and HUP all clean up.
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, _exit_on_signal)
    return COMMANDS[name].execute(args)
