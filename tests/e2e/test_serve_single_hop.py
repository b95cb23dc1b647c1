"""The monolith topology over real HTTP: one Serve deployment (the ingress with the whole model inside, one
hop fewer than `single`) answers as `mmfusion evaluate` predicts, batches concurrent requests with its
user_config's knobs, reports them in /v1/metadata, maps a bad input to a 4xx naming the field, and keeps the
API key, health and metrics of the other topologies."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from tests.e2e.test_serve import (
    API_KEY,
    AUTH,
    app_config,
    deployment,
    free_port,
    offline_and_items,
    post,
    send,
)
from tests.unit.test_serving_engine import make_artifact

from mmfusion.artifact import load_artifact
from mmfusion.serving.config import check_serve_config
from mmfusion.serving.server import deploy_config

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def mono(ray_local, avt_tiny, tmp_path_factory):
    from ray import serve

    art = make_artifact(avt_tiny, tmp_path_factory.mktemp("serve_monolith") / "art",
                        "data.modalities=[image,text]")
    app = app_config(art, "mono", "/", topology="monolith", api_key=API_KEY)
    assert [d["name"] for d in app["deployments"]] == ["Monolith"]
    deployment(app, "Monolith").update(user_config={"max_batch_size": 4, "batch_wait_timeout_s": 0.05},
                                       ray_actor_options={"num_cpus": 0.5})
    port = free_port()
    raw = {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": port},
           "applications": [app]}
    deploy_config(check_serve_config(raw, "test config"), timeout_s=300)
    yield f"http://127.0.0.1:{port}", art
    serve.shutdown()


def test_one_deployment_answers_like_offline_evaluation_and_batches(mono, avt_tiny):
    from ray import serve

    url, art = mono
    assert set(serve.status().applications["mono"].deployments) == {"Monolith"}  # no Ingress, no Model
    probs, items = offline_and_items(art, avt_tiny, None)
    labels = load_artifact(art).labels
    with ThreadPoolExecutor(8) as pool:  # multipart and JSON/base64 alternately
        answers = list(pool.map(lambda a: send(url, a[1], a[0] % 2 == 1, AUTH), enumerate(items)))
    assert [r.status_code for r in answers] == [200] * len(items), answers[0].text
    got = np.array([[r.json()["probabilities"][lab] for lab in labels] for r in answers])
    np.testing.assert_allclose(got, probs, atol=1e-5, rtol=0)

    meta = requests.get(f"{url}/v1/metadata", headers=AUTH, timeout=30).json()
    assert meta["topology"] == "monolith" and set(meta["batching"]) == {"model"}
    stats = meta["batching"]["model"]
    assert stats["rows"] == len(items)  # every row through the model's batched method, once
    assert 1 < stats["max_batch"] <= 4  # concurrent requests batched, capped by the user_config


def test_errors_auth_and_health(mono):
    url, _ = mono
    r = post(url, files={"image": ("x.png", b"not an image"), "text": (None, "three")}, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["field"] == "image"
    assert post(url, files={"text": (None, "three")}).status_code == 401
    h = requests.get(f"{url}/healthz", timeout=30)
    assert h.status_code == 200 and h.json() == {"status": "ok", "topology": "monolith"}
