"""Logging that a failure repeating on every pass cannot turn into a flood."""

from __future__ import annotations

import logging
import time

# How often the same kind of failure is logged again (seconds).
LOG_EVERY = 10.0


class FailureLog:
    """Logs an error at most once per ``LOG_EVERY`` seconds per kind: a failure that
    repeats on every pass must not flood the log."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self._last: dict[str, float] = {}

    def error(self, kind: str, message: str, *args: object, exc_info: bool = False) -> None:
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < LOG_EVERY:
            return
        self._last[kind] = now
        self.logger.error(message, *args, exc_info=exc_info)
