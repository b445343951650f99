"""Prometheus metrics of the edge server: one object per server, created once on a registry it is given.

A registry per server (not the process default) lets tests run several servers in one process and
lets each scrape show exactly one server. Labels are fixed: model, precision, backend (+ code).
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LABELS = ("model", "precision", "backend")
# Milliseconds matter here: edges at 10 ms, 33 ms (a 30-FPS frame) and 50 ms are SLO lines.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.003,
    0.004,
    0.005,
    0.0075,
    0.010,
    0.015,
    0.020,
    0.025,
    0.033,
    0.050,
    0.075,
    0.100,
    0.250,
    0.500,
    1.0,
    2.5,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# Requests refused before a model is known (unknown name, wrong token) carry these labels, so
# user-chosen names never become label values.
UNKNOWN = ("", "", "")


@dataclass(frozen=True)
class ModelLabels:
    model: str
    precision: str
    backend: str

    def values(self) -> tuple[str, str, str]:
        return (self.model, self.precision, self.backend)


class EdgeMetrics:
    """Every series the edge server exports; `labels` tuples are (model, precision, backend)."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.request_seconds = Histogram(
            "rtq_request_duration_seconds",
            "ModelInfer time in the server, from request received to response ready",
            LABELS,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.refusal_seconds = Histogram(
            "rtq_refusal_duration_seconds",
            "ModelInfer requests refused without compute (queue full, deadline out of reach, shutting "
            "down), from request received to the status sent",
            (*LABELS, "code"),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_seconds = Histogram(
            "rtq_queue_duration_seconds",
            "Time a request waited in its model's batching queue",
            LABELS,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.compute_seconds = Histogram(
            "rtq_compute_duration_seconds",
            "Runtime inference time of one batch",
            LABELS,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "rtq_batch_size",
            "Images per executed batch",
            LABELS,
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.requests = Counter(
            "rtq_requests_total",
            "ModelInfer requests answered, by gRPC status code",
            (*LABELS, "code"),
            registry=registry,
        )
        self.labelled = Counter(
            "rtq_predictions_labelled_total",
            "Images that came with a label (request parameter 'label')",
            LABELS,
            registry=registry,
        )
        self.correct = Counter(
            "rtq_predictions_correct_total",
            "Labelled images whose top-1 class equals the label",
            LABELS,
            registry=registry,
        )
        self.inflight = Gauge(
            "rtq_inflight_requests", "ModelInfer requests being handled", LABELS, registry=registry
        )
        self.queue_depth = Gauge(
            "rtq_queue_depth", "Requests waiting in the model's batching queue", LABELS, registry=registry
        )
        self.model_ready = Gauge(
            "rtq_model_ready", "1 when the variant is loaded and serving", LABELS, registry=registry
        )

    def count(self, labels: tuple[str, str, str], code: str) -> None:
        self.requests.labels(*labels, code).inc()


def serve_metrics(registry: CollectorRegistry, host: str, port: int):
    """Start the scrape endpoint on its own port; returns (server, thread) for shutdown."""
    return start_http_server(port, addr=host, registry=registry)
