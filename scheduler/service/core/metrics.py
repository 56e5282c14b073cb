"""Prometheus metrics: counters and histograms the service updates, and gauges read from the engine at scrape."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

WAIT_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400)


class Metrics:
    """One registry per service instance (tests build many services in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.wait = Histogram(
            "corral_job_wait_seconds",
            "Time from submission to first admission.",
            ["queue"],
            buckets=WAIT_BUCKETS,
            registry=self.registry,
        )
        self.cycle = Histogram(
            "corral_scheduling_cycle_seconds",
            "Duration of one scheduling cycle.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=self.registry,
        )
        self.preemptions = Counter("corral_preemptions", "Jobs preempted, by cause.", ["cause"], registry=self.registry)

    def add_gauges(self, read: Callable[[], list[Metric]]) -> None:
        """Gauges computed at scrape time from live state (queues, pools, GPUs)."""
        self.registry.register(_Live(read))


class _Live(Collector):
    def __init__(self, read: Callable[[], list[Metric]]):
        self.read = read

    def collect(self) -> Iterator[Metric]:
        yield from self.read()


def gauge(name: str, doc: str, labels: list[str], samples: Sequence[tuple[list[str], float]]) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=labels)
    for values, v in samples:
        g.add_metric(values, v)
    return g
