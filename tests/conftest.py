"""Session-wide test hygiene."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.harness import make_harness
from tests.helpers import ServerProcess


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A session that passed leaves no server logs in /tmp; one that failed keeps them all,
    to read next to the failure. Only servers that have stopped are touched."""
    if exitstatus != pytest.ExitCode.OK:
        return
    for server in ServerProcess.created:
        if server.proc.poll() is not None:
            server.remove_files()
    ServerProcess.created.clear()


@pytest.fixture
def harness(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """``harness(**options)``: an in-process dispatch path (tests/harness.py)."""
    yield from make_harness(monkeypatch)
