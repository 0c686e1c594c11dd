"""Prometheus metrics under TF Serving's names, plus the batching and version gauges."""

from __future__ import annotations

import prometheus_client

__all__ = ["Metrics"]


class Metrics:
    """One registry per server, so servers in one process (tests) keep separate counts."""

    def __init__(self) -> None:
        self.registry = prometheus_client.CollectorRegistry(auto_describe=True)
        self.requests = prometheus_client.Counter(
            ":tensorflow:serving:request_count",
            "Requests by model, API, entry point and final status (as TF Serving).",
            ["model_name", "API", "entrypoint", "status"],
            registry=self.registry,
        )
        self.latency = prometheus_client.Histogram(
            ":tensorflow:serving:request_latency",
            "Request latency in microseconds (as TF Serving), by model, API and entry point.",
            ["model_name", "API", "entrypoint"],
            buckets=(
                100,
                250,
                500,
                1000,
                2500,
                5000,
                10000,
                25000,
                50000,
                100000,
                250000,
                500000,
                1000000,
                2500000,
                5000000,
            ),
            registry=self.registry,
        )
        self.batch_size = prometheus_client.Histogram(
            "tfrs_devserver_processed_batch_size",
            "Rows per batch run by the batching queue.",
            ["model_name"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            registry=self.registry,
        )
        self.versions = prometheus_client.Gauge(
            "tfrs_devserver_loaded_versions",
            "Versions currently available per model.",
            ["model_name"],
            registry=self.registry,
        )

    def observe(self, model: str, api: str, entry: str, status: str, seconds: float) -> None:
        """One finished request: counted by final status; latency in microseconds, as TF Serving."""
        self.requests.labels(model, api, entry, status).inc()
        self.latency.labels(model, api, entry).observe(seconds * 1e6)
