"""Whether the server tells load balancers to send it traffic, apart from whether it can.

Pure: requests and the time in, decisions out; the primary carries them out. Two reasons
to say "not ready" (``/readyz`` 503, agent-check ``drain``/``maint``) while still serving:

- *maintenance*: ``SIGWINCH``, ``dispatch ctl drain``, ``Server.drain()``; ``Server.undrain()`` (or ``SIGWINCH``
  again) ends it. Nothing else changes: workers keep serving every connection that comes;
- *stopping after a delay*: a graceful stop with ``drain_delay`` keeps accepting and
  serving for that long, so the balancer's health checks see the 503 and stop sending
  before the listeners close; then the usual graceful drain starts.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DrainState:
    """Maintenance on or off, and when a delayed stop is due (``time.monotonic()``)."""

    maintenance: bool = False
    stop_at: float | None = None

    def set_maintenance(self, on: bool | None) -> bool:
        """Turn maintenance on, off, or (None) over; returns whether it is on now."""
        self.maintenance = not self.maintenance if on is None else on
        return self.maintenance

    def delay_stop(self, now: float, delay: float) -> bool:
        """A graceful stop was asked: True if it should start now, False if it waits
        ``delay`` seconds first (``due()`` says when)."""
        if delay <= 0 or self.stop_at is not None:
            return True
        self.stop_at = now + delay
        return False

    @property
    def delaying(self) -> bool:
        """A graceful stop is waiting out ``drain_delay``."""
        return self.stop_at is not None

    def due(self, now: float) -> bool:
        """True once, when the delayed stop should start."""
        if self.stop_at is not None and now >= self.stop_at:
            self.stop_at = None
            return True
        return False

    @property
    def reason(self) -> str | None:
        """Why the server says it is not ready although it serves, or None."""
        if self.stop_at is not None:
            return "shutting down (serving until drain_delay is over)"
        if self.maintenance:
            return "drained (maintenance)"
        return None
