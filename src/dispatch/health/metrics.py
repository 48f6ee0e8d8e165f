"""``/metrics``: the primary's state in the Prometheus text format, read at scrape time.

Needs the optional ``prometheus_client`` (``pip install 'dispatch[metrics]'``):
importing this module without it raises ``ImportError``, and ``HealthServer``
then answers ``/metrics`` with a 501.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import prometheus_client
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from dispatch import supervisor
from dispatch.health.http import render
from dispatch.health.source import PrimaryView
from dispatch.health.views import sorted_workers, worker_connections_total, worker_rss

#: The classic text format; prometheus_client's own default moved to 1.0.0.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Restart causes always exported (at 0 until they happen), so rate() has a series.
RESTART_CAUSES = ("exit", "signal", "timeout", "recycle", "spawn")
#: The ``state`` label values, always exported (at 0 when no worker is in that phase).
STATES = tuple(str(phase) for phase in (supervisor.BOOTING, supervisor.READY, supervisor.DRAINING))


class MetricsView:
    """Renders ``/metrics`` from a private registry holding only this primary's collector."""

    def __init__(self, server: PrimaryView) -> None:
        self._registry = prometheus_client.CollectorRegistry(auto_describe=False)
        self._registry.register(MetricsCollector(server))

    def __call__(self) -> bytes:
        return render(200, prometheus_client.generate_latest(self._registry), METRICS_CONTENT_TYPE)


class MetricsCollector:
    """A prometheus_client collector: reads the primary's state at scrape time."""

    def __init__(self, server: PrimaryView) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        yield from self._cluster()
        yield from self._workers()

    def _cluster(self) -> Iterator[Metric]:
        server = self.server
        counters = server.counters
        yield CounterMetricFamily("dispatch_connections_dispatched",
                                  "Connections the primary passed to workers.",
                                  value=server.dispatched_total)
        restarts = CounterMetricFamily("dispatch_worker_restarts",
                                       "Workers replaced, by cause.", labels=["cause"])
        for cause in sorted(set(RESTART_CAUSES) | set(server.restarts_by_cause)):
            restarts.add_metric([cause], server.restarts_by_cause.get(cause, 0))
        yield restarts
        yield CounterMetricFamily("dispatch_accept_backpressure",
                                  "Times a worker's channel was full (EAGAIN) and it was skipped.",
                                  value=counters.backpressure)
        yield CounterMetricFamily("dispatch_connections_salvaged",
                                  "Connections taken back from dead workers and passed to others.",
                                  value=counters.salvaged)
        yield CounterMetricFamily("dispatch_connections_reclaimed",
                                  "Connections taken back unread from a worker that was not reading "
                                  "and passed to one that was (reclaim_after).",
                                  value=counters.reclaimed)
        yield CounterMetricFamily("dispatch_worker_stalls",
                                  "Times a worker went silent and stopped receiving connections.",
                                  value=counters.stalls)
        yield CounterMetricFamily("dispatch_accept_errors", "Failed accept() calls in the primary.",
                                  value=counters.accept_errors)
        yield CounterMetricFamily("dispatch_inflight_full",
                                  "Times no more descriptors could be in flight to workers "
                                  "(budget or ETOOMANYREFS) and accepting paused.",
                                  value=counters.inflight_full)
        yield CounterMetricFamily("dispatch_policy_errors",
                                  "Answers of the balancing policy that were invalid or raised "
                                  "(round-robin answered instead).",
                                  value=counters.policy_errors)
        yield CounterMetricFamily("dispatch_spawn_errors",
                                  "Workers that could not be forked (fork, socketpair, pidfd_open).",
                                  value=counters.spawn_errors)
        yield GaugeMetricFamily("dispatch_connections_in_flight",
                                "Connections passed to workers and not yet reported done (pull: waiting in the queue).",
                                value=server.in_flight)
        yield GaugeMetricFamily("dispatch_accept_paused",
                                "1 while workers exist but the primary is not accepting.",
                                value=1 if server.workers and not server.accepting else 0)
        yield GaugeMetricFamily("dispatch_pending_connections",
                                "Connections accepted (or taken back) but not yet passed on.",
                                value=server.pending_count)
        yield GaugeMetricFamily("dispatch_uptime_seconds", "Seconds since the primary started.",
                                value=time.time() - server.started_at)

    def _workers(self) -> Iterator[Metric]:
        workers = sorted_workers(self.server)
        by_state = GaugeMetricFamily("dispatch_workers", "Worker processes, by state.", labels=["state"])
        counts = dict.fromkeys(STATES, 0)
        for w in workers:
            counts[str(w.state)] = counts.get(str(w.state), 0) + 1
        for state, count in counts.items():
            by_state.add_metric([state], count)
        yield by_state

        labels = ["worker", "pid"]
        rss = GaugeMetricFamily("dispatch_worker_memory_rss_bytes",
                                "Resident memory of each worker.", labels=labels)
        active = GaugeMetricFamily("dispatch_worker_connections_active",
                                   "Connections each worker is handling (last heartbeat).", labels=labels)
        total = CounterMetricFamily("dispatch_worker_connections",
                                    "Connections passed to (kernel modes: handled by) each worker.",
                                    labels=labels)
        cpu = CounterMetricFamily("dispatch_worker_cpu_seconds",
                                  "User+system CPU time of each worker (last heartbeat).", labels=labels)
        skipped = CounterMetricFamily("dispatch_worker_skipped_busy",
                                      "Batches each worker was passed over for: it had not read the "
                                      "connections it was given while another had (skip_busy).",
                                      labels=labels)
        reclaimed = CounterMetricFamily("dispatch_worker_reclaimed",
                                        "Connections taken back unread from each worker while it was "
                                        "not reading and another was (reclaim_after).", labels=labels)
        age = GaugeMetricFamily("dispatch_worker_heartbeat_age_seconds",
                                "Seconds since each worker was last heard from.", labels=labels)
        now = time.monotonic()
        for w in workers:
            values = [str(w.worker_id), str(w.pid)]
            rss.add_metric(values, worker_rss(w))
            active.add_metric(values, w.report.active if w.report is not None else 0)
            total.add_metric(values, worker_connections_total(w))
            cpu.add_metric(values, w.report.cpu_ms / 1000 if w.report is not None else 0)
            skipped.add_metric(values, w.skipped_busy)
            reclaimed.add_metric(values, w.reclaimed)
            age.add_metric(values, max(0.0, now - w.last_seen))
        yield from (rss, active, total, cpu, skipped, reclaimed, age)
