"""Serving metrics over real HTTP: a few requests to a split image + text model, then a scrape of Ray's
Prometheus endpoint finds mmfusion's request counter by status (a 4xx too), its latency histogram and the
encoders' batch sizes, next to Serve's own per-deployment latency."""

from __future__ import annotations

import re
import time

import pytest
import requests
from tests.e2e.test_serve import REPO, app_config, free_port, post
from tests.unit.test_serving_engine import make_artifact

from mmfusion.data.readers import read_records
from mmfusion.serving.config import check_serve_config
from mmfusion.serving.server import deploy_config

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def served(ray_local, avt_tiny, tmp_path_factory):
    from ray import serve

    art = make_artifact(avt_tiny, tmp_path_factory.mktemp("serve_metrics") / "art",
                        "data.modalities=[image,text]")
    port = free_port()
    raw = {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": port},
           "applications": [app_config(art, "metrics", "/")]}
    deploy_config(check_serve_config(raw, "test config"), timeout_s=300)
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def _scrape(ray, want: list[str], wait_s: float = 60.0) -> str:
    """Ray's metrics endpoint on this node, polled until every pattern in `want` shows (the metrics agent
    exports every few seconds)."""
    port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])
    deadline = time.monotonic() + wait_s
    while True:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        if all(re.search(p, text) for p in want) or time.monotonic() > deadline:
            return text
        time.sleep(1.0)


def test_requests_by_status_latency_and_batch_sizes_reach_the_prometheus_endpoint(ray_local, served,
                                                                                   avt_tiny):
    rows = [r for r in read_records(str(avt_tiny), "test").to_pylist() if r["image"] and r["text"]][:3]
    for r in rows:
        assert post(served, files={"image": ("i.png", r["image"]), "text": (None, r["text"])}).ok
    assert post(served, files={"text": (None, rows[0]["text"])}).ok  # a modality subset
    bad = post(served, data=b"hello", headers={"content-type": "text/plain"})
    assert bad.status_code == 415

    ok = r'ray_mmfusion_requests_total\{[^}]*modalities="image\+text"[^}]*status="200"[^}]*\} 3\.0'
    rejected = r'ray_mmfusion_requests_total\{[^}]*status="415"[^}]*\} 1\.0'
    reason = r'ray_mmfusion_rejected_total\{[^}]*reason="content-type"[^}]*status="415"[^}]*\} 1\.0'
    latency = r'ray_mmfusion_request_latency_seconds_count\{[^}]*route="/v1/predict"[^}]*status="200"'
    batches = r'ray_mmfusion_batch_size_count\{[^}]*deployment="ImageEncoder"'
    serve_latency = r'ray_serve_deployment_processing_latency_ms_bucket\{[^}]*deployment="Fusion"'
    # every series the Grafana dashboard charts must exist on the endpoint too; Serve's controller exports
    # some (replica health) on its own schedule, so the scrape waits for them as well
    dashboard = (REPO / "deploy" / "grafana" / "mmfusion-serving.json").read_text()
    names = set(re.findall(r"\b(ray_[a-z_]+)\{", dashboard))
    charted = [rf"(?m)^{n}\{{" for n in sorted(names)]
    text = _scrape(ray_local, [ok, rejected, reason, latency, batches, serve_latency, *charted])
    for pattern in (ok, rejected, reason, latency, batches, serve_latency):
        assert re.search(pattern, text), pattern
    assert re.search(r'ray_mmfusion_requests_total\{[^}]*modalities="text"[^}]*status="200"', text)
    assert names and not [p for p in charted if not re.search(p, text)]
