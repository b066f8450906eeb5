"""Prometheus metrics of P2, in a registry of their own (one per app, so tests can build many).

Labels are bounded: the route template (never the raw path; "unmatched" for unknown paths), the
method ("other" outside the standard ones: stip_http.edge.method_label), the status and the
output mode. No label ever carries a session id, a credential or a tensor value.
"""

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "stip_cloud_requests",
            "HTTP requests by route template, method and status",
            ["endpoint", "method", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "stip_cloud_request_seconds",
            "HTTP request latency by route template",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.forward_seconds = Histogram(
            "stip_cloud_forward_seconds",
            "Forward latency (decode, model, encode) by output mode",
            ["output"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.model_seconds = Histogram(
            "stip_cloud_model_seconds",
            "Time in the stock model's forward, per (batched) forward pass",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_rows = Histogram(
            "stip_cloud_batch_rows",
            "Rows of each forward pass P2 ran (concurrent requests batched together)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.tokens = Counter("stip_cloud_tokens", "Real (unmasked) tokens processed by forward", registry=r)
        self.push_bytes = Counter("stip_cloud_push_bytes", "Bytes of weight pushes received", registry=r)
        self.pushes = Counter("stip_cloud_pushes", "Weight pushes by outcome", ["outcome"], registry=r)
        self.active_sessions = Gauge("stip_cloud_active_sessions", "Live sessions", registry=r)
        self.session_cache_bytes = Gauge(
            "stip_cloud_session_cache_bytes", "Approximate KV cache memory held by sessions", registry=r
        )
        self.deployments = Gauge("stip_cloud_deployments", "Active deployments", registry=r)

    def bind(
        self, *, sessions: Callable[[], float], cache_bytes: Callable[[], float], deployments: Callable[[], float]
    ) -> None:
        """Gauges read on scrape from the live objects."""
        self.active_sessions.set_function(sessions)
        self.session_cache_bytes.set_function(cache_bytes)
        self.deployments.set_function(deployments)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def record_request(self, *, method: str, route: str, status: int, headers_s: float | None, total_s: float) -> None:
        """One HTTP request (stip_http.metrics.RequestMetrics calls this)."""
        self.requests.labels(route, method, str(status)).inc()
        self.request_seconds.labels(route).observe(total_s)
