"""Prometheus metrics of P1, in a registry per app (so tests can build several apps)."""

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "stip_developer_http_requests", "HTTP requests", ["method", "route", "status"], registry=r
        )
        self.latency = Histogram(
            "stip_developer_http_request_duration_seconds",
            "time to the response headers",
            ["method", "route"],
            registry=r,
        )
        self.jobs = Counter("stip_developer_jobs", "finished transform+push jobs", ["kind", "outcome"], registry=r)
        self.job_seconds = Histogram(
            "stip_developer_job_duration_seconds",
            "transform+push job duration",
            ["kind"],
            buckets=(1, 5, 15, 60, 300, 900, 3600, 4 * 3600),
            registry=r,
        )
        self.pushed_bytes = Counter("stip_developer_pushed_bytes", "θ′ bytes sent to P2", registry=r)
        self.bundles = Counter("stip_developer_user_bundles", "user bundles served", registry=r)
        self.credentials_issued = Counter("stip_developer_credentials_issued", "user credentials issued", registry=r)
        self.auth_failures = Counter("stip_developer_auth_failures", "refused tokens", ["kind"], registry=r)
        self.deployments = Gauge("stip_developer_deployments", "deployments by status", ["status"], registry=r)
        self._refresh: Callable[[], None] | None = None

    def on_scrape(self, refresh: Callable[[], None]) -> None:
        """`refresh` sets the gauges from the current state before each scrape."""
        self._refresh = refresh

    def render(self) -> bytes:
        if self._refresh is not None:
            self._refresh()
        return generate_latest(self.registry)

    def record_request(self, *, method: str, route: str, status: int, headers_s: float | None, total_s: float) -> None:
        """One HTTP request (stip_http.metrics.RequestMetrics calls this): the latency is to its headers."""
        if headers_s is not None:
            self.latency.labels(method, route).observe(headers_s)
        self.requests.labels(method, route, str(status)).inc()
