"""What a freshly forked worker does before it serves, and how it exits.

``worker_main`` runs in the child right after ``fork``: it undoes what the
fork copied from the primary (signal handlers, the wakeup pipe, the
primary's descriptors), arranges to die with the primary, drops privileges
(``dispatch.privileges``), runs the ``on_worker_start`` hook, imports the
handler, tells what it is (``dispatch.interfaces``), and runs a ``Worker``
until it is done. It never returns: the exit
code tells the primary how it ended.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from typing import Any, NoReturn

from dispatch.config import Config
from dispatch.handlers import load_handler
from dispatch.interfaces import CannotServe
from dispatch.privileges import (
    PrivilegeError,
    die_with_primary,
    drop_privileges,
    primary_pid,
    user_name,
)
from dispatch.worker import EXIT_BOOT_ERROR, EXIT_CRASH, Worker

log = logging.getLogger("dispatch.worker")

# The primary's own signals: a worker leaves them to it.
_PRIMARY_SIGNALS = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU)


def worker_main(
    config: Config,
    worker_id: int,
    channel: socket.socket,
    listeners: list[socket.socket],
    inherited_fds: list[int],
    family: int = 0,
) -> NoReturn:
    """Run a worker in a freshly forked child; never returns.

    ``inherited_fds`` are the primary's descriptors the child must close;
    ``channel`` and ``listeners`` are the ones it keeps.
    """
    code = EXIT_CRASH
    try:
        primary = primary_pid(channel)
        _reset_process(worker_id, inherited_fds, primary)
        _drop_privileges(config, primary)
        _lower_priority(worker_id, config.worker_nice)
        if config.worker_affinity:
            _pin_to_cpu(worker_id)
        if config.on_worker_start is not None:
            config.on_worker_start(worker_id)
        try:
            handler = load_handler(config.handler)
            worker = Worker(config, worker_id, channel, listeners, handler, family)
        except CannotServe as exc:  # an ambiguous app, a missing extra: the message says it all
            log.error("worker %d (pid %d) cannot serve %r: %s", worker_id, os.getpid(), config.handler, exc)
            code = EXIT_BOOT_ERROR
        except BaseException:
            log.exception("worker %d (pid %d) cannot load handler %r", worker_id, os.getpid(), config.handler)
            code = EXIT_BOOT_ERROR
        else:
            code = worker.run()
    except PrivilegeError as exc:  # never serve as anyone but the configured user
        log.critical("worker %d (pid %d) cannot drop privileges: %s", worker_id, os.getpid(), exc)
        code = EXIT_BOOT_ERROR
    except BaseException:
        log.exception("worker %d (pid %d) crashed", worker_id, os.getpid())
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _reset_process(worker_id: int, inherited_fds: list[int], primary: int) -> None:
    """Undo what the fork copied from the primary that a worker must not keep."""
    signal.set_wakeup_fd(-1)  # the primary's wakeup pipe
    for signum in _PRIMARY_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the primary coordinates the stop
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)
    if not die_with_primary(primary):  # the primary died before the kernel was asked
        os._exit(EXIT_CRASH)
    for fd in inherited_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    _tag_log_records(worker_id)
    try:
        from setproctitle import setproctitle
    except ImportError:
        pass
    else:
        setproctitle(f"dispatch: worker {worker_id}")


def _lower_priority(worker_id: int, increment: int) -> None:
    """``worker_nice``: yield the CPU to the primary when every core is busy. Raising one's
    own nice value needs no privilege; a failure is logged and the worker serves anyway."""
    if not increment:
        return
    try:
        os.nice(increment)
    except OSError as exc:
        log.warning("worker %d (pid %d) cannot lower its priority by %d: %s", worker_id, os.getpid(),
                    increment, exc)


def cpu_for(worker_id: int, allowed: set[int]) -> int:
    """``worker_affinity``: the CPU of worker ``worker_id``, the Nth of ``allowed`` in order,
    wrapping around (a slot keeps its CPU across replacements)."""
    cpus = sorted(allowed)
    return cpus[worker_id % len(cpus)]


def _pin_to_cpu(worker_id: int) -> None:
    """``worker_affinity``: run on one CPU of the mask inherited from the primary (a
    container's cpuset, ``taskset``). A failure is logged and the worker serves unpinned."""
    try:
        cpu = cpu_for(worker_id, os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
        log.info("worker %d (pid %d) runs on CPU %d only", worker_id, os.getpid(), cpu)
    except OSError as exc:
        log.warning("worker %d (pid %d) cannot pin itself to a CPU: %s; it runs on any",
                    worker_id, os.getpid(), exc)


def _tag_log_records(worker_id: int) -> None:
    """Every log record made in this worker carries ``record.worker_id``."""
    make_record = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        record.worker_id = worker_id
        return record

    logging.setLogRecordFactory(factory)


def _drop_privileges(config: Config, primary: int) -> None:
    """Bound as root in the primary; handle connections as ``user``/``group``."""
    if config.uid is None and config.gid is None:
        return
    drop_privileges(config.uid, config.gid, user_name(config.uid))
    if not die_with_primary(primary):  # the switch cleared PR_SET_PDEATHSIG: set it again
        os._exit(EXIT_CRASH)
