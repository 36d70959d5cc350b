"""The server's Prometheus metrics, in a registry of their own (one per app).

encoder_jax_requests_total{endpoint,status}   requests answered, by HTTP status
encoder_jax_request_seconds{endpoint}         latency, arrival to answer
encoder_jax_batch_rows / _batch_seconds       rows per model call, and its duration
encoder_jax_queue_rows                        rows waiting for a batch
encoder_jax_tokens_total, _tokens_per_second  real (unpadded) tokens run; rate over the last 10 s
encoder_jax_compilations_total                XLA compilations in this process (flat after warm-up)
encoder_jax_ready                             1 once warm-up has compiled every shape
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any, Sequence

import jax
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_compilations = 0
_listening = False
_lock = threading.Lock()


def _count_compile(event: str, duration: float, **kwargs) -> None:
    global _compilations
    if event == _COMPILE_EVENT:
        with _lock:
            _compilations += 1


def compilations() -> int:
    """XLA backend compilations in this process since the first `Metrics` was made."""
    return _compilations


class _CompileCollector:
    def collect(self):
        family = CounterMetricFamily("encoder_jax_compilations", "XLA compilations in this process")
        family.add_metric([], compilations())
        yield family


class Metrics:
    """The metrics of one server and the hooks that update them."""

    TOKEN_WINDOW_S = 10.0

    def __init__(self):
        global _listening
        with _lock:
            if not _listening:
                jax.monitoring.register_event_duration_secs_listener(_count_compile)
                _listening = True
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("encoder_jax_requests", "Requests answered", ["endpoint", "status"],
                                registry=registry)
        self.latency = Histogram("encoder_jax_request_seconds", "Request latency", ["endpoint"],
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10),
                                 registry=registry)
        self.batch_rows = Histogram("encoder_jax_batch_rows", "Rows per model call",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=registry)
        self.batch_seconds = Histogram("encoder_jax_batch_seconds", "Model call duration",
                                       buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5),
                                       registry=registry)
        self.queue_rows = Gauge("encoder_jax_queue_rows", "Rows waiting for a batch", registry=registry)
        self.tokens = Counter("encoder_jax_tokens", "Real tokens run", registry=registry)
        self.tokens_per_second = Gauge("encoder_jax_tokens_per_second",
                                       "Real tokens run per second over the last 10 s",
                                       registry=registry)
        self.tokens_per_second.set_function(self._token_rate)
        self.ready = Gauge("encoder_jax_ready", "1 once warm-up is done", registry=registry)
        registry.register(_CompileCollector())
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._recent_lock = threading.Lock()
        self.compilations = compilations

    def observe_batch(self, kind: str, rows: Sequence[Any], seconds: float) -> None:
        tokens = sum(len(row.ids) for row in rows)
        self.batch_rows.observe(len(rows))
        self.batch_seconds.observe(seconds)
        self.tokens.inc(tokens)
        with self._recent_lock:
            self._recent.append((time.monotonic(), tokens))

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def _token_rate(self) -> float:
        horizon = time.monotonic() - self.TOKEN_WINDOW_S
        with self._recent_lock:
            while self._recent and self._recent[0][0] < horizon:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / self.TOKEN_WINDOW_S
