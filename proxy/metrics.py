"""Prometheus metrics, one registry per app (so several apps in one process stay apart).

Per process: with `--workers N` each worker answers for itself; scrape each or aggregate.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from proxy.gateway import Gateway
    from proxy.shared import Shared

KEY_STATES = ("active", "cooling", "exhausted", "disabled")
OWN_KEYS = "own-key"  # the client label of every [auth] passthrough caller
disable_created_metrics()  # the *_created series only double the output


class _PoolCollector(Collector):
    """Key states and tasks waiting, read from the gateway at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gateway = self.metrics.gateway
        states = GaugeMetricFamily("proxy_upstream_keys", "Upstream keys by state", labels=["upstream", "state"])
        in_flight = GaugeMetricFamily("proxy_upstream_key_in_flight", "Calls in flight per upstream key",
                                      labels=["upstream", "key"])
        waiting = GaugeMetricFamily("proxy_tasks_waiting", "Upstream tasks the proxy is waiting on")
        shared = self.metrics.shared
        if shared is not None:
            yield GaugeMetricFamily("proxy_shared_state_up", "1 while Redis (shared state) answers; 0 while this "
                                    "process serves from its own state, its limits split", value=int(shared.active))
        if gateway is not None:
            for name, pool in gateway.pools.items():
                for state in KEY_STATES:
                    states.add_metric([name, state], sum(1 for k in pool.keys if k.state == state))
                for key in pool.keys:
                    in_flight.add_metric([name, key.fingerprint], key.in_flight)
            waiting.add_metric([], gateway.tasks.waiting)
        yield states
        yield in_flight
        yield waiting


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.gateway: Gateway | None = None
        self.shared: Shared | None = None
        self.requests = Counter("proxy_requests", "Requests answered", ["client", "model", "status"],
                                registry=self.registry)
        self.upstream_latency = Histogram(
            "proxy_upstream_latency_seconds", "Upstream call latency", ["upstream", "operation"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=self.registry)
        self._latency_children: dict[tuple[str, str], Any] = {}
        self.budget_spent = Gauge("proxy_budget_spent", "Spent in the current budget period", ["client"],
                                  registry=self.registry)
        self.budget_limit = Gauge("proxy_budget_limit", "Budget of the current period", ["client"],
                                  registry=self.registry)
        self.registry.register(_PoolCollector(self))

    def count_request(self, client: str, model: str, status: int) -> None:
        # people's own keys share one label value: a series per key fingerprint would grow with
        # every made-up token a stranger sends (the access log keeps the fingerprint)
        label = OWN_KEYS if client.startswith(f"{OWN_KEYS}:") else client
        self.requests.labels(label, model, str(status)).inc()

    def observe_upstream(self, upstream: str, operation: str, seconds: float) -> None:
        child = self._latency_children.get((upstream, operation))
        if child is None:  # labels() per call costs more than the observation itself
            child = self._latency_children[(upstream, operation)] = self.upstream_latency.labels(upstream, operation)
        child.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
