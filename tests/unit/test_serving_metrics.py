"""Serving metrics middleware without Ray: the tags it records and the access-log line it writes."""

from __future__ import annotations

import logging

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.testclient import TestClient

from mmfusion.serving import metrics as sm


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, float, dict]] = []

    def inc(self, value: float = 1.0, tags: dict | None = None) -> None:
        self.calls.append(("inc", value, tags or {}))

    def observe(self, value: float, tags: dict | None = None) -> None:
        self.calls.append(("observe", value, tags or {}))

    def set(self, value: float, tags: dict | None = None) -> None:
        self.calls.append(("set", value, tags or {}))


class FakeMetrics:
    def __init__(self) -> None:
        self.requests, self.latency, self.rejected = Recorder(), Recorder(), Recorder()
        self.in_flight, self.batch = Recorder(), Recorder()
        self.inside = 0


@pytest.fixture
def fake(monkeypatch):
    m = FakeMetrics()
    monkeypatch.setattr(sm, "_metrics", m)
    return m


@pytest.fixture
def client():
    api = FastAPI()
    api.add_middleware(sm.ObserveRequests)

    @api.post("/v1/predict")
    async def predict(request: Request) -> JSONResponse:
        body = await request.json()
        request.state.modalities = sorted(body)
        if "bad" in body:
            request.state.reject = body["bad"]  # a field name (here client-chosen: must not become a tag)
            return JSONResponse({"error": {}}, status_code=422)
        if "boom" in body:
            raise RuntimeError("a bug")
        return JSONResponse({"label": "3"})

    @api.get("/stream")
    async def stream() -> StreamingResponse:
        return StreamingResponse(iter([b"a", b"b"]), status_code=206)

    return TestClient(api, raise_server_exceptions=False)


def test_requests_are_counted_by_status_and_modalities_and_timed(fake, client):
    assert client.post("/v1/predict", json={"image": "x", "text": "secret words"}).status_code == 200
    assert client.post("/v1/predict", json={"text": "t", "bad": "image"}).status_code == 422
    assert client.post("/v1/predict", json={"text": "t", "bad": "zzz-made-up"}).status_code == 422
    assert client.get("/wp-login.php").status_code == 404
    reqs = [c[2] for c in fake.requests.calls]
    assert reqs[0] == {"route": "/v1/predict", "method": "POST", "status": "200", "modalities": "image+text"}
    assert reqs[1]["status"] == "422" and reqs[1]["modalities"] == "bad+text"
    assert reqs[3] == {"route": "other", "method": "GET", "status": "404", "modalities": "none"}
    assert [c[2]["status"] for c in fake.latency.calls] == ["200", "422", "422", "404"]
    assert all(c[1] >= 0 for c in fake.latency.calls)
    assert [c[2]["reason"] for c in fake.rejected.calls] == ["image", "other", "request"]
    assert fake.inside == 0 and fake.in_flight.calls[-1][1] == 0


def test_an_exception_in_the_app_counts_as_a_500_and_streamed_answers_by_their_status(fake, client):
    assert client.post("/v1/predict", json={"text": "t", "boom": 1}).status_code == 500
    assert client.get("/stream").status_code == 206
    reqs = [c[2] for c in fake.requests.calls]
    assert reqs[0] == {"route": "/v1/predict", "method": "POST", "status": "500", "modalities": "boom+text"}
    assert reqs[1]["status"] == "206" and reqs[1]["route"] == "other"
    assert fake.rejected.calls == [] and fake.inside == 0


def test_the_middleware_is_pure_asgi_not_base_http_middleware():
    """BaseHTTPMiddleware adds a task and a response stream per request (measured: bench/serve_ladder.py)."""
    from starlette.middleware.base import BaseHTTPMiddleware

    from mmfusion.serving.deployments import api

    mws = [mw.cls for mw in api.user_middleware]
    assert sm.ObserveRequests in mws and BaseHTTPMiddleware not in mws


def test_the_access_log_line_has_the_request_but_never_its_content(fake, client, caplog):
    caplog.set_level(logging.INFO, logger="mmfusion.serving.access")
    client.post("/v1/predict", json={"image": "aGVsbG8=", "text": "secret words"},
                headers={"x-request-id": "req-42"})
    [line] = [r.getMessage() for r in caplog.records if r.name == "mmfusion.serving.access"]
    assert line.startswith("method=POST path=/v1/predict status=200 latency_ms=")
    assert "modalities=image+text" in line and "request_id=req-42" in line and "reject=-" in line
    assert "secret" not in line and "aGVsbG8" not in line


def test_batch_sizes_feed_the_histogram_and_metadata_counters(fake):
    b = sm.BatchSizes()
    b.add(3)
    b.add(1)
    assert [c[1] for c in fake.batch.calls] == [3, 1]
    assert b.as_dict()["rows"] == 4 and b.as_dict()["max_batch"] == 3


def test_the_grafana_dashboard_charts_the_metrics_this_module_exports():
    import json
    import re
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "mmfusion-serving.json"
    dash = json.loads(path.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(exprs) >= 8 and all(p["datasource"]["uid"] == "${datasource}" for p in dash["panels"])
    used = {re.sub(r"_(bucket|sum|count|total)$", "", n)
            for n in re.findall(r"ray_(mmfusion_[a-z_]+)\{", " ".join(exprs))}
    exported = {"mmfusion_requests", "mmfusion_request_latency_seconds", "mmfusion_rejected",
                "mmfusion_requests_in_flight", "mmfusion_batch_size"}
    assert used == exported
    source = Path(sm.__file__).read_text()
    assert all(f'"{name}"' in source for name in exported)
