"""Serving metrics on Ray's Prometheus endpoint (ray.serve.metrics) and one access-log line per request.

Exported by every node's Ray metrics agent (Prometheus adds the `ray_` prefix; Serve adds the deployment,
replica and application tags):

    ray_mmfusion_requests_total{route, method, status, modalities}    requests by status and modality subset
    ray_mmfusion_request_latency_seconds{route, status}                end-to-end latency in the ingress
    ray_mmfusion_rejected_total{route, status, reason}                 4xx answers by field ("image", "body")
    ray_mmfusion_batch_size{deployment}                                rows per @serve.batch call
    ray_mmfusion_requests_in_flight                                    requests inside the ingress now

Per-deployment latency and queues come from Serve's own metrics on the same endpoint
(ray_serve_deployment_processing_latency_ms, ray_serve_deployment_queued_queries,
ray_serve_replica_processing_queries); deploy/grafana/mmfusion-serving.json charts both.

The access-log line (logger mmfusion.serving.access, logfmt) holds method, path, status, latency, modalities,
the rejected field and the request id, never media or text content.

Hooks in deployments.py: `api.add_middleware(ObserveRequests)` (pure ASGI); `request.state.modalities =
used` once the modalities are known; `request.state.reject = field` in the RequestError handler;
`BatchSizes()` as the replicas' batch counters.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mmfusion.serving.batching import BatchStats

access_log = logging.getLogger("mmfusion.serving.access")

LATENCY_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256]


class _Metrics:
    """The metric objects of one replica process (created there, so Serve tags them with its replica)."""

    def __init__(self) -> None:
        from ray.serve.metrics import Counter, Gauge, Histogram

        self.requests = Counter("mmfusion_requests", tag_keys=("route", "method", "status", "modalities"),
                                description="HTTP requests by status and modality subset")
        self.latency = Histogram("mmfusion_request_latency_seconds", description="end-to-end request latency "
                                 "in the ingress", boundaries=LATENCY_BUCKETS_S, tag_keys=("route", "status"))
        self.rejected = Counter("mmfusion_rejected", description="4xx answers by the field they name",
                                tag_keys=("route", "status", "reason"))
        self.in_flight = Gauge("mmfusion_requests_in_flight", description="requests inside the ingress")
        self.batch = Histogram("mmfusion_batch_size", description="rows per batched call",
                               boundaries=BATCH_BUCKETS)
        self.inside = 0
        if not access_log.handlers:  # a replica's stderr: its log file, and the driver's console
            from mmfusion.logs import DATEFMT, FORMAT

            h = logging.StreamHandler()
            h.setFormatter(logging.Formatter(FORMAT, DATEFMT))
            access_log.addHandler(h)
            access_log.setLevel(logging.INFO)
            access_log.propagate = False


_metrics: _Metrics | None = None


def metrics() -> _Metrics:
    global _metrics
    if _metrics is None:
        _metrics = _Metrics()
    return _metrics


# the fields a RequestError names (a tag value per client-chosen JSON key would grow without bound)
REASONS = frozenset({"image", "text", "audio", "body", "content-type", "content-length", "authorization",
                     "host", "origin", "path", "method", "request", "header", "modalities"})


def reason_of(field: str | None) -> str:
    return field if field in REASONS else "other" if field else "request"


def route_of(path: str) -> str:
    """A bounded tag value: the API's own paths, everything else "other" (no tag per scanned URL)."""
    return path if path in ("/v1/predict", "/v1/metadata", "/healthz", "/docs", "/openapi.json") else "other"


def access_line(method: str, path: str, status: int, latency_s: float, modalities: list[str] | None,
                reject: str | None, request_id: str | None) -> str:
    """logfmt: method=POST path=/v1/predict status=200 latency_ms=12.3 modalities=image+text ..."""
    fields: dict[str, Any] = {"method": method, "path": path, "status": status,
                              "latency_ms": f"{latency_s * 1000:.1f}",
                              "modalities": "+".join(modalities) if modalities else "-",
                              "reject": reject or "-", "request_id": request_id or "-"}
    return " ".join(f"{k}={v}" for k, v in fields.items())


def _request_id(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name.lower() == b"x-request-id" and value:
            return value.decode("latin-1")[:64]
    try:  # the id Serve's proxy gave this request (and returns in the x-request-id response header)
        from ray.serve.context import _get_serve_request_context

        return _get_serve_request_context().request_id or None
    except Exception:
        return None


class ObserveRequests:
    """Pure ASGI middleware of the ingress: count, time and log every HTTP request.

    `api.add_middleware(ObserveRequests)`. It wraps `send` to see the response's status and reads what the
    handlers left in the request's state (`request.state.modalities`, `request.state.reject`, both stored in
    `scope["state"]`). Unlike Starlette's BaseHTTPMiddleware it adds no task, no stream and no copy of the
    response per request. An exception that escapes the app counts as a 500 (Starlette's outermost
    ServerErrorMiddleware turns it into the 500 answer).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        m = metrics()
        m.inside += 1
        m.in_flight.set(m.inside)
        state = scope.setdefault("state", {})  # Request.state of every handler below reads and writes this
        status = 500
        start = time.perf_counter()

        async def send_observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        finally:
            elapsed = time.perf_counter() - start
            m.inside -= 1
            m.in_flight.set(m.inside)
            state = scope.get("state", state)
            method, path = scope.get("method", "-"), scope.get("path", "")
            route = route_of(path)
            mods: list[str] | None = state.get("modalities")
            reject: str | None = state.get("reject")
            m.requests.inc(tags={"route": route, "method": method, "status": str(status),
                                 "modalities": "+".join(mods) if mods else "none"})
            m.latency.observe(elapsed, tags={"route": route, "status": str(status)})
            if 400 <= status < 500:
                m.rejected.inc(tags={"route": route, "status": str(status), "reason": reason_of(reject)})
            access_log.info(access_line(method, path, status, elapsed, mods, reject,
                                        _request_id(scope.get("headers") or [])))


class BatchSizes(BatchStats):
    """The replicas' batch counters (`batch_stats` in /v1/metadata), also a Prometheus histogram."""

    def add(self, n: int) -> None:
        super().add(n)
        metrics().batch.observe(n)
