"""Prometheus metrics of one server: what the HTTP layer counts, plus the engine's gauges read at scrape time.

Each app gets its own registry (no process globals), so several apps can live in one test process. Engine state
(running/waiting requests, state slots, KV blocks, prefix-cache counters) is not mirrored into gauges on every
step; a collector calls `engine.stats()` when /metrics is scraped and exports every numeric field of it as
`kda_serving_engine_<field>`, so new engine fields show up without touching this file.
"""

from __future__ import annotations

import dataclasses
import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

logger = logging.getLogger(__name__)

# Seconds. CPU prefill of a long prompt takes seconds; a GPU decode step a few milliseconds.
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class EngineStatsCollector:
    """Exports `engine.stats()` (a dataclass of numbers) as gauges at scrape time."""

    def __init__(self, engine):
        self.engine = engine

    def describe(self):
        return []  # the fields are only known once the engine answers; skip registry-time collection

    def collect(self):
        try:
            stats = self.engine.stats()
        except Exception:  # a scrape must not fail because the engine is starting or shutting down
            logger.exception("engine.stats() failed during a /metrics scrape")
            return
        values = dataclasses.asdict(stats) if dataclasses.is_dataclass(stats) else dict(vars(stats))
        for rate in ("prefix_cache_hit_rate", "spec_acceptance_rate"):  # properties, not fields
            if hasattr(stats, rate):
                values[rate] = getattr(stats, rate)
        for name, value in values.items():
            metric = f"kda_serving_engine_{name}"
            if isinstance(value, dict):  # e.g. finish_reasons: {"stop": 3, "length": 5}
                family = GaugeMetricFamily(metric, f"engine.stats().{name}", labels=["key"])
                for key, count in value.items():
                    family.add_metric([str(key)], count)
                yield family
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                yield GaugeMetricFamily(metric, f"engine.stats().{name}", value=value)


class ServerMetrics:
    def __init__(self, engine):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("kda_serving_requests", "Engine requests (one per choice) finished, by reason",
                                ["endpoint", "finish_reason"], registry=r)
        self.aborted = Counter("kda_serving_requests_aborted",
                               "Engine requests aborted by the server (client gone or error)", ["endpoint"],
                               registry=r)
        self.http_errors = Counter("kda_serving_http_errors", "Error answers, by HTTP status", ["status"],
                                   registry=r)
        self.prompt_tokens = Counter("kda_serving_prompt_tokens", "Prompt tokens of accepted requests",
                                     registry=r)
        self.cached_prompt_tokens = Counter("kda_serving_cached_prompt_tokens",
                                            "Prompt tokens served from the prefix cache", registry=r)
        self.generation_tokens = Counter("kda_serving_generation_tokens", "Generated tokens", registry=r)
        self.in_flight = Gauge("kda_serving_http_requests_in_flight", "Generation requests being served",
                               registry=r)
        self.time_to_first_token = Histogram("kda_serving_time_to_first_token_seconds",
                                             "From request accepted to first generated token",
                                             buckets=_TTFT_BUCKETS, registry=r)
        self.inter_token_latency = Histogram("kda_serving_inter_token_latency_seconds",
                                             "Between consecutive generated tokens of one request",
                                             buckets=_ITL_BUCKETS, registry=r)
        self.request_latency = Histogram("kda_serving_request_latency_seconds",
                                         "From request accepted to its last token", buckets=_LATENCY_BUCKETS,
                                         registry=r)
        self._prompt_total = 0
        self._cached_total = 0
        hit_rate = Gauge("kda_serving_prefix_cache_hit_rate",
                         "Cached prompt tokens / prompt tokens, over the server's lifetime", registry=r)
        hit_rate.set_function(self._hit_rate)
        r.register(EngineStatsCollector(engine))

    def watch_response_store(self, store) -> None:
        """Gauges of the stored /v1/responses answers (server/response_store.py), read at scrape time."""
        for name, doc, read in (("kda_serving_stored_responses", "Responses kept for previous_response_id", len),
                                ("kda_serving_stored_response_bytes", "Their JSON text, against the budget",
                                 lambda s: s.bytes_used)):
            Gauge(name, doc, registry=self.registry).set_function(lambda read=read: read(store))

    def watch_admission(self, admission) -> None:
        """A gauge of the generation requests admitted (server/admission.py), read at scrape time; refused ones
        are the 429s of kda_serving_http_errors_total."""
        Gauge("kda_serving_admitted_requests", "Generation requests admitted and not yet over "
              "(bounded by --max-concurrent-requests)", registry=self.registry).set_function(
            lambda: admission.admitted)

    def count_prompt(self, prompt_tokens: int, cached_tokens: int) -> None:
        """Count one served prompt and how much of it the prefix cache supplied."""
        self.prompt_tokens.inc(prompt_tokens)
        self.cached_prompt_tokens.inc(cached_tokens)
        self._prompt_total += prompt_tokens
        self._cached_total += cached_tokens

    def _hit_rate(self) -> float:
        return self._cached_total / self._prompt_total if self._prompt_total else 0.0

    def render(self) -> bytes:
        return generate_latest(self.registry)
