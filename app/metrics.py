"""Prometheus metrics named like vLLM's with the `splitfuse:` prefix; label sets are fixed.

Engine gauges and counters are read from the engine at scrape time; request histograms are
observed by the routes. One registry per server, no module globals.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "splitfuse:"
FINISH_REASONS = ("stop", "length", "abort", "error", "tool_calls")
_LATENCY = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], dict[str, Any]]):
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self.stats()
        for name, doc in (
            ("num_requests_running", "Sequences in the running batch."),
            ("num_requests_waiting", "Sequences waiting to be scheduled."),
            ("kv_cache_usage_perc", "Fraction of KV cache blocks in use."),
        ):
            yield GaugeMetricFamily(PREFIX + name, doc, value=s[name])
        for name, key, doc in (
            ("prefix_cache_queries", "prefix_cache_queries", "Prompt tokens looked up."),
            ("prefix_cache_hits", "prefix_cache_hits", "Prompt tokens found in the cache."),
            ("num_preemptions", "num_preemptions", "Sequences preempted."),
            ("prompt_tokens", "prompt_tokens_computed", "Prompt tokens prefilled."),
            ("generation_tokens", "generation_tokens", "Tokens generated."),
        ):
            yield CounterMetricFamily(PREFIX + name, doc, value=s[key])


class Metrics:
    """The server's registry and the request-level metrics the routes observe."""

    def __init__(self, engine_stats: Callable[[], dict[str, Any]]):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine_stats))
        self.request_success = Counter(
            PREFIX + "request_success",
            "Finished requests.",
            ["finished_reason"],
            registry=self.registry,
        )
        for reason in FINISH_REASONS:
            self.request_success.labels(reason)
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "Time to first token.",
            buckets=_LATENCY,
            registry=self.registry,
        )
        self.itl = Histogram(
            PREFIX + "inter_token_latency_seconds",
            "Time between deltas.",
            buckets=_LATENCY,
            registry=self.registry,
        )
        self.e2e = Histogram(
            PREFIX + "e2e_request_latency_seconds",
            "Request latency.",
            buckets=_LATENCY,
            registry=self.registry,
        )
        self.queue_time = Histogram(
            PREFIX + "request_queue_time_seconds",
            "Time waiting before the first schedule.",
            buckets=_LATENCY,
            registry=self.registry,
        )

    def finished(self, reason: str | None) -> None:
        self.request_success.labels(reason if reason in FINISH_REASONS else "error").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
