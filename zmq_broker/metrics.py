"""Prometheus metrics for the broker, off unless ``--metrics-bind`` is given.

The loop already counts everything in plain dicts; once per tick it publishes an immutable
snapshot, and the scrape thread reads only that snapshot. No per-message work is added to the hot
path, and the scrape never races the loop. Latency histograms are observed once per finished
invocation, from the loop.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterator

from .heap import PAUSE_BUCKETS, GcPauses

log = logging.getLogger("zerorun.broker.metrics")


class BrokerMetrics:
    def __init__(self, bind: str):
        from prometheus_client import CollectorRegistry, Histogram, start_http_server

        host, _, port = bind.rpartition(":")
        self.registry = CollectorRegistry()
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600)
        self.dispatch_latency = Histogram(
            "zerorun_dispatch_latency_seconds", "From command request to delivery acknowledged by the agent",
            buckets=buckets, registry=self.registry)
        self.completion_latency = Histogram(
            "zerorun_completion_latency_seconds", "From command request to the invocation's result stored",
            buckets=buckets, registry=self.registry)
        self.store_write = Histogram(
            "zerorun_store_write_seconds", "Duration of one group commit to the state store",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1), registry=self.registry)
        self.gc_pauses = GcPauses()  # published with the loop's snapshot
        self._snapshot: dict[str, Any] = {}
        self.registry.register(_SnapshotCollector(self))
        self.server, self.thread = start_http_server(int(port), addr=host or "127.0.0.1", registry=self.registry)
        self.address = f"{host or '127.0.0.1'}:{self.server.server_port}"
        log.info("metrics on http://%s/metrics", self.address)

    def publish(self, snapshot: dict[str, Any]) -> None:
        self._snapshot = snapshot  # one reference swap: the scrape thread sees old or new, whole

    def observe_invocation(self, requested_at: float, delivered_at: float, ended_at: float) -> None:
        if delivered_at:
            self.dispatch_latency.observe(max(0.0, delivered_at - requested_at))
        if ended_at:
            self.completion_latency.observe(max(0.0, ended_at - requested_at))

    def close(self) -> None:
        self.gc_pauses.close()
        self.server.shutdown()


class _SnapshotCollector:
    def __init__(self, metrics: BrokerMetrics):
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        snap = self.metrics._snapshot
        agents = GaugeMetricFamily("zerorun_agents", "Known instances by ping status", labels=["ping_status"])
        for status, count in snap.get("agents", {}).items():
            agents.add_metric([status], count)
        yield agents
        commands = CounterMetricFamily("zerorun_commands", "Commands finished, by status", labels=["status"])
        for status, count in snap.get("commands", {}).items():
            commands.add_metric([status], count)
        yield commands
        invocations = CounterMetricFamily("zerorun_invocations", "Invocations finished, by status",
                                          labels=["status"])
        for status, count in snap.get("invocations", {}).items():
            invocations.add_metric([status], count)
        yield invocations
        messages = CounterMetricFamily("zerorun_messages", "Messages handled", labels=["direction"])
        messages.add_metric(["in"], snap.get("messages_in", 0))
        messages.add_metric(["out"], snap.get("messages_out", 0))
        messages.add_metric(["requests"], snap.get("requests", 0))
        yield messages
        rejected = CounterMetricFamily("zerorun_messages_rejected", "Messages dropped, by reason",
                                       labels=["reason"])
        for reason, count in snap.get("rejected", {}).items():
            rejected.add_metric([reason], count)
        yield rejected
        for name, doc in (("active_commands", "Commands this broker dispatches (owns) and that have not finished"),
                          ("open_invocations", "Invocations not yet finished"),
                          ("queued_invocations", "Invocations waiting for dispatch (rate control or offline)"),
                          ("waiters", "Clients long-polling for results or output"),
                          ("pending_keys", "Agent keys awaiting acceptance")):
            yield GaugeMetricFamily(f"zerorun_{name}", doc, value=snap.get(name, 0))
        yield GaugeMetricFamily("zerorun_sessions_held", "Agent sessions connected to this broker",
                                value=snap.get("sessions_held", 0))
        cluster = CounterMetricFamily("zerorun_cluster_events", "Work exchanged with the other brokers of a cluster",
                                      labels=["kind"])
        for kind, count in snap.get("cluster", {}).items():
            cluster.add_metric([kind], count)
        yield cluster
        webhooks = snap.get("webhooks", {})
        delivered = CounterMetricFamily("zerorun_webhooks", "Webhook notifications by outcome: delivered, failed "
                                        "(given up), attempt_failures (attempts that failed and were retried)",
                                        labels=["outcome"])
        for outcome in ("delivered", "failed", "attempt_failures"):
            delivered.add_metric([outcome], webhooks.get(outcome, 0))
        yield delivered
        yield GaugeMetricFamily("zerorun_webhooks_pending", "Webhook notifications not yet delivered (store-wide)",
                                value=webhooks.get("pending", 0))
        outputs = snap.get("whole_outputs", {})
        whole = CounterMetricFamily("zerorun_whole_outputs", "Whole outputs read from agents into the output "
                                    "store, by outcome", labels=["outcome"])
        for outcome in ("completed", "incomplete"):
            whole.add_metric([outcome], outputs.get(outcome, 0))
        yield whole
        yield CounterMetricFamily("zerorun_whole_output_bytes", "Bytes of whole outputs read from agents",
                                  value=outputs.get("bytes_read", 0))
        s3 = CounterMetricFamily("zerorun_s3_copies", "Whole outputs copied to the S3 sink, by outcome",
                                 labels=["outcome"])
        for outcome, count in snap.get("s3", {}).items():
            s3.add_metric([outcome], count)
        yield s3
        yield CounterMetricFamily("zerorun_policy_reload_failures", "Policy files that failed to load (the previous "
                                  "policy stayed in force)", value=snap.get("policy_reload_failures", 0))
        yield CounterMetricFamily("zerorun_audit_write_failures", "Audit log writes that failed (new work is refused "
                                  "while they fail)", value=snap.get("audit_write_failures", 0))
        yield CounterMetricFamily("zerorun_pruned_commands", "Finished commands forgotten past the retention "
                                  "(--retention-days) by this broker", value=snap.get("pruned_commands", 0))
        yield CounterMetricFamily("zerorun_internal_errors", "Faults of the broker's own that it logged and "
                                  "served on after (a message, a tick, a pruning pass)",
                                  value=snap.get("internal_errors", 0))
        yield from _gc_families(snap.get("gc"))
        yield GaugeMetricFamily("zerorun_snapshot_timestamp_seconds", "When these figures were taken",
                                value=snap.get("taken_at", time.time()))


def _gc_families(figures: dict[str, Any] | None) -> Iterator[Any]:
    """The garbage collector's pauses of the broker's process (each holds the loop)."""
    if not figures:
        return
    from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily

    pauses = HistogramMetricFamily("zerorun_gc_pause_seconds", "How long each garbage collection held the broker, "
                                   "by generation (2: a full collection)", labels=["generation"])
    longest = GaugeMetricFamily("zerorun_gc_pause_longest_seconds", "The longest garbage collection since the "
                                "broker started, by generation", labels=["generation"])
    for generation in range(3):
        counts, total = figures["buckets"][generation], 0
        buckets = []
        for bound, count in zip((*map(str, PAUSE_BUCKETS), "+Inf"), counts):
            total += count
            buckets.append((bound, total))
        pauses.add_metric([str(generation)], buckets, sum_value=figures["seconds"][generation])
        longest.add_metric([str(generation)], figures["longest"][generation])
    yield pauses
    yield longest
