"""The gateway's Prometheus metrics, kept in a registry of their own (one per app, never the global one)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from layerline.runtime.api import InferResult

__all__ = ["ASYNC_STATUSES", "BUCKETS", "CONTENT_TYPE", "OUTCOMES", "GatewayMetrics"]

#: Histogram buckets from 0.1 ms to 30 s, roughly 1-2.5-5 per decade.
BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)

#: The ``outcome`` label values of ``layerline_requests_total``.
OUTCOMES = (
    "ok",
    "bad_request",
    "not_found",
    "too_large",
    "overloaded",
    "stage_failed",
    "unavailable",
    "deadline",
    "error",
)

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

#: The ``status`` label values of ``layerline_async_requests`` (``layerline.serve.jobs.STATUSES``).
ASYNC_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled", "expired")


class GatewayMetrics:
    """Counters and histograms of one gateway app."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "layerline_requests",
            "Inference requests by endpoint and outcome.",
            ["endpoint", "outcome"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "layerline_request_seconds",
            "End-to-end time of an inference request in the gateway (body read to response ready).",
            ["endpoint"],
            buckets=BUCKETS,
            registry=r,
        )
        self.compute_seconds = Histogram(
            "layerline_stage_compute_seconds",
            "Time a stage spent in onnxruntime for one request.",
            ["stage"],
            buckets=BUCKETS,
            registry=r,
        )
        self.transfer_seconds = Histogram(
            "layerline_stage_transfer_seconds",
            "Time a stage spent sending one request's result downstream.",
            ["stage"],
            buckets=BUCKETS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "layerline_stage_queue_seconds",
            "Time a request waited in a stage between arriving and its compute starting.",
            ["stage"],
            buckets=BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "layerline_in_flight", "Inference requests being handled by the gateway now.", registry=r
        )
        self.async_requests = Gauge(
            "layerline_async_requests",
            "Asynchronous requests (/v1/requests) held by the gateway, by status.",
            ["status"],
            registry=r,
        )
        for status in ASYNC_STATUSES:
            self.async_requests.labels(status).set(0)
        self.async_results_bytes = Gauge(
            "layerline_async_results_bytes",
            "Bytes of finished async results kept by the gateway.",
            registry=r,
        )
        self.async_inputs_bytes = Gauge(
            "layerline_async_inputs_bytes",
            "Bytes of inputs held for queued and running async requests.",
            registry=r,
        )
        self.async_evictions = Counter(
            "layerline_async_evictions",
            "Finished async requests whose result was dropped, by reason (ttl or bytes).",
            ["reason"],
            registry=r,
        )
        for reason in ("ttl", "bytes"):
            self.async_evictions.labels(reason)
        self.async_finished = Counter(
            "layerline_async_finished",
            "Async requests that finished, by final status (succeeded, failed, cancelled).",
            ["status"],
            registry=r,
        )

    def observe_result(self, result: InferResult) -> None:
        """Record the per-stage timings of one completed request."""
        for timing in result.stages:
            stage = str(timing.stage)
            self.compute_seconds.labels(stage).observe(timing.compute_s)
            self.transfer_seconds.labels(stage).observe(timing.send_s)
            self.queue_seconds.labels(stage).observe(timing.queue_s)

    def count(self, endpoint: str, outcome: str, seconds: float) -> None:
        """Record one finished request."""
        assert outcome in OUTCOMES, outcome
        self.requests.labels(endpoint, outcome).inc()
        self.request_seconds.labels(endpoint).observe(seconds)

    def render(self) -> bytes:
        """The registry in Prometheus text format 0.0.4."""
        return generate_latest(self.registry)
