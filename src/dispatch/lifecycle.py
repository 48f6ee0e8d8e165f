"""The vocabulary of supervision: a worker's phases, what is known of it, and the actions.

Pure data. A worker moves ``booting -> ready -> draining`` (or straight from
booting to draining when it is stopped before it is ready), and nothing else:
``WorkerState.move`` refuses any other move, as h11 refuses an illegal event.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

#: Exit code of the primary when workers keep failing to boot.
EXIT_BOOT_FAILURE = 3


class Phase(str, Enum):
    """Where a worker is in its life. A ``str``, so it prints and serialises as its value."""

    BOOTING = "booting"
    READY = "ready"
    DRAINING = "draining"

    def __str__(self) -> str:
        return self.value

    # Equal to its value, so it must hash like it: {"ready": 1}[Phase.READY] works.
    __hash__ = str.__hash__


BOOTING, READY, DRAINING = Phase.BOOTING, Phase.READY, Phase.DRAINING

#: The only moves a worker makes.
TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    BOOTING: frozenset({READY, DRAINING}),
    READY: frozenset({DRAINING}),
    DRAINING: frozenset(),
}


class IllegalTransition(ValueError):
    """A worker was asked to make a move its phase does not allow (a second ``Ready``)."""


# ---------------------------------------------------------------- actions
@dataclass(frozen=True)
class Spawn:
    """Fork a worker for slot ``worker_id``; ``replaces`` is the pid it takes over from.

    ``cause`` is set when the spawn is a restart the metrics count ("recycle").
    """

    worker_id: int
    replaces: int | None = None
    cause: str | None = None


@dataclass(frozen=True)
class Drain:
    """Stop sending to ``pid`` first, then tell it to finish and exit."""

    pid: int


@dataclass(frozen=True)
class Kill:
    """SIGKILL ``pid``; ``cause`` is counted in the restart metrics."""

    pid: int
    cause: str


@dataclass(frozen=True)
class Stall:
    """``pid`` is silent too long: pass it nothing, take back what it has not read."""

    pid: int
    silent: float


@dataclass(frozen=True)
class Resume:
    """``pid`` spoke again after a stall: pass it connections again."""

    pid: int


@dataclass(frozen=True)
class Stop:
    """Every worker is gone: leave the loop and exit with ``code``."""

    code: int


@dataclass(frozen=True)
class Log:
    level: int
    message: str


Action = Spawn | Drain | Kill | Stall | Resume | Stop | Log


# ---------------------------------------------------------------- state
@dataclass
class WorkerState:
    """What the supervisor knows of one worker process."""

    worker_id: int
    pid: int
    spawned_at: float
    state: Phase = BOOTING
    last_seen: float = 0.0
    deadline: float | None = None  # boot or drain deadline
    replaces: int | None = None  # pid of the worker this one takes over from
    retiring: bool = False  # a replacement is on its way; exit is expected
    kill_cause: str | None = None
    recycle_why: str | None = None  # asked to recycle; retried after a failed replacement
    request_limit: int = 0  # recycle after this many connections (0: never)
    stalled: bool = False  # silent too long: passed over until it speaks again
    said_ready: bool = False

    def move(self, phase: Phase) -> None:
        if phase not in TRANSITIONS[self.state]:
            raise IllegalTransition(f"worker {self.worker_id} (pid {self.pid}) cannot go from {self.state} to {phase}")
        self.state = phase


@dataclass
class Slot:
    """A worker id: survives the processes that fill it."""

    boot_failures: int = 0
    respawn_at: float | None = None
    restarts: int = 0
    recycle_failures: int = 0  # replacements for a recycle that died before ready, in a row
    recycle_not_before: float = 0.0

