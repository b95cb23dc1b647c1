"""Ray Serve over real HTTP on 127.0.0.1: three applications from serve/local.yaml, deployed once per module.

    /        split topology, three-modality model          (equivalence, bad inputs, batching, metadata)
    /single  single topology, image + text model, API key  (equivalence, auth, missing modality, 503)
    /scale   split topology, image-only model, encoder autoscaling min 1 max 2 with short delays
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.unit.test_hostile_inputs import encoded, wav_declaring, zero_png
from tests.unit.test_serving_engine import make_artifact, tone, wav_bytes

from mmfusion.artifact import load_artifact
from mmfusion.data.readers import read_records
from mmfusion.evaluate.report import predict_split
from mmfusion.serving.config import check_serve_config, prepare_config
from mmfusion.serving.server import deploy_config

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
API_KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MODALITIES = ("image", "text", "audio")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_config(artifact: Path, name: str, route: str, **args) -> dict:
    """One application of serve/local.yaml, fitted to `artifact` by the same code `mmfusion serve` uses."""
    raw = prepare_config(yaml.safe_load((REPO / "serve" / "local.yaml").read_text()), str(artifact),
                         topology=args.pop("topology", None))
    app = raw["applications"][0]
    app.update(name=name, route_prefix=route)
    app["args"].update(args)
    return app


def deployment(app: dict, name: str) -> dict:
    return next(d for d in app["deployments"] if d["name"] == name)


@pytest.fixture(scope="module")
def arts(avt_tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_e2e")
    return {"full": make_artifact(avt_tiny, root / "full"),
            "image_text": make_artifact(avt_tiny, root / "image_text", "data.modalities=[image,text]"),
            "image": make_artifact(avt_tiny, root / "image", "data.modalities=[image]")}


@pytest.fixture(scope="module")
def server(ray_local, arts):
    from ray import serve

    split = app_config(arts["full"], "mm", "/")
    single = app_config(arts["image_text"], "single", "/single", topology="single", api_key=API_KEY)
    ingress = deployment(single, "Ingress")
    ingress.update(max_ongoing_requests=2, max_queued_requests=2)  # tiny queue: the overload test gets 503s
    deployment(single, "Model").update(max_ongoing_requests=8,  # local.yaml's entry, smaller for the tests
                                       user_config={"max_batch_size": 8, "batch_wait_timeout_s": 0.005},
                                       ray_actor_options={"num_cpus": 0.3})
    scale = app_config(arts["image"], "scale", "/scale")
    enc = deployment(scale, "ImageEncoder")
    enc.pop("num_replicas")
    enc.update(max_ongoing_requests=8, user_config={"max_batch_size": 4, "batch_wait_timeout_s": 0.02},
               autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                                   "upscale_delay_s": 0.5, "downscale_delay_s": 2.0,
                                   "metrics_interval_s": 0.25, "look_back_period_s": 1.0})
    port = free_port()
    raw = {"proxy_location": "HeadOnly",
           "http_options": {"host": "127.0.0.1", "port": port, "request_timeout_s": 60},
           "applications": [split, single, scale]}
    deploy_config(check_serve_config(raw, "test config"), timeout_s=300)
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def post(url: str, *, files=None, json=None, data=None, headers=None,
         timeout: float = 60) -> requests.Response:
    return requests.post(f"{url}/v1/predict", files=files, json=json, data=data, headers=headers,
                         timeout=timeout)


def healthy(url: str) -> bool:
    return requests.get(f"{url}/healthz", timeout=30).status_code == 200


def offline_and_items(art: Path, data: Path, keep: list[str] | None) -> tuple[np.ndarray, list[dict]]:
    """`mmfusion evaluate`'s probabilities for the test split, and the same rows' raw inputs."""
    preds = predict_split(load_artifact(art), str(data), "test", modalities=keep)
    mods = keep or list(load_artifact(art).spec.modalities)
    rows = {r["id"]: {m: r[m] for m in mods if r[m] is not None and r[m] != ""}
            for r in read_records(str(data), "test").to_pylist()}
    items = [it for it in (rows[i] for i in preds.ids) if it]  # predict_split drops rows left with nothing
    assert len(items) == len(preds.probs) >= 20
    return preds.probs, items


def send(url: str, item: dict, as_json: bool, headers: dict | None = None) -> requests.Response:
    if as_json:
        body = {m: (base64.b64encode(v).decode() if m != "text" else v) for m, v in item.items()}
        return post(url, json=body, headers=headers)
    files = {m: (m, v) if m != "text" else (None, v) for m, v in item.items()}
    return post(url, files=files, headers=headers)


# ---------------------------------------------------------------------------------- 1: equivalence


@pytest.mark.parametrize("app, art, keep", [
    ("", "full", None), ("", "full", ["image"]), ("", "full", ["text"]), ("", "full", ["audio"]),
    ("/single", "image_text", None), ("/single", "image_text", ["text"]),
])
def test_served_probabilities_equal_offline_evaluate(server, arts, avt_tiny, app, art, keep):
    url = server + app
    headers = AUTH if app == "/single" else None
    offline, items = offline_and_items(arts[art], avt_tiny, keep)
    labels = load_artifact(arts[art]).labels
    # multipart and JSON/base64 alternately; /single has a tiny ingress queue (for the overload test)
    with ThreadPoolExecutor(2 if app == "/single" else 8) as pool:
        answers = list(pool.map(lambda a: send(url, a[1], a[0] % 2 == 1, headers), enumerate(items)))
    assert [r.status_code for r in answers] == [200] * len(items), answers[0].text
    served = np.array([[r.json()["probabilities"][lab] for lab in labels] for r in answers])
    np.testing.assert_allclose(served, offline, atol=1e-5, rtol=0)
    assert np.abs(offline - offline.mean(0)).max() > 1e-3  # the rows differ far beyond the tolerance
    for r, item, p in zip(answers, items, offline, strict=True):
        body = r.json()
        assert body["modalities"] == [m for m in MODALITIES if m in item]
        assert body["label"] == labels[int(p.argmax())] and body["index"] == int(p.argmax())


# ---------------------------------------------------------------------------------- 2: bad inputs


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()  # noise compresses badly: a PNG cut in half has lost image data
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28), dtype=np.uint8)).save(
        buf, format="PNG")
    return buf.getvalue()


def _chunks(total: int, size: int = 1 << 20):
    for _ in range(total // size + 1):
        yield b"a" * size


JSON = {"Content-Type": "application/json"}
BAD = {  # name: (request kwargs, status, field, words in the message)
    "corrupt image bytes": (dict(files={"image": ("x.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)}), 400,
                            "image", "image format"),
    "truncated image": (dict(files={"image": ("x.png", _png()[:400])}), 400, "image", "undecodable"),
    "text file sent as audio": (dict(files={"audio": ("notes.txt", b"seven, said clearly\n" * 20,
                                                      "text/plain")}),
                                400, "audio", "undecodable"),
    "empty body": (dict(data=b"", headers={"Content-Type": "application/json"}), 400, "body", "empty"),
    "malformed JSON": (dict(data=b'{"text": "one"', headers={"Content-Type": "application/json"}), 400,
                       "body", "not valid JSON"),
    "malformed multipart": (dict(data=b"--xyz\r\nnot a part header\r\n\r\n--xyz", headers={
        "Content-Type": "multipart/form-data; boundary=xyz"}), 400, "body", "multipart"),
    "multipart without a boundary": (dict(data=b"x", headers={"Content-Type": "multipart/form-data"}), 400,
                                     "content-type", "boundary"),
    "no modality at all": (dict(json={}), 422, "body", "no modality"),
    "only an empty text": (dict(json={"text": ""}), 422, "body", "no modality"),
    "unknown JSON field": (dict(json={"text": "one", "label": "1"}), 422, "label", "unknown field"),
    "unknown multipart field": (dict(files={"video": ("v.mp4", b"0000")}), 422, "video", "unknown field"),
    "image sent as a form field": (dict(files={"image": (None, "/etc/passwd")}), 422, "image", "file upload"),
    "wrong content type": (dict(data=b"text=one", headers={"Content-Type": "text/plain"}), 415,
                           "content-type", "unsupported"),
    "form-urlencoded": (dict(data={"text": "one"}), 415, "content-type", "unsupported"),
    "invalid base64": (dict(json={"image": "iVBORw0KGgo*not*base64"}), 400, "image", "invalid base64"),
    "oversize payload": (dict(files={"image": ("big.png", b"\x00" * (10 * 1024 * 1024 + 1))}), 413, "body",
                         "limit is 10485760"),
    "oversize chunked payload": (dict(data=_chunks(10 * 1024 * 1024 + 1), headers={
        "Content-Type": "application/json"}), 413, "body", "exceeds the limit"),
    "audio of zero bytes": (dict(files={"audio": ("a.wav", b"")}), 400, "audio", "empty (0 bytes)"),
    "audio of zero samples": (dict(files={"audio": ("a.wav", wav_bytes(np.zeros(0, np.float32)))}), 400,
                              "audio", "zero-length"),
    "all-zero audio": (dict(files={"audio": ("a.wav", wav_bytes(np.zeros(8000, np.float32)))}), 422, "audio",
                       "silent clip"),
    "NaN audio": (dict(files={"audio": ("a.wav", wav_bytes(np.full(800, np.nan, np.float32),
                                                           subtype="FLOAT"))}),
                  400, "audio", "non-finite"),
    "a bad modality beside good ones": (dict(files={"image": ("x.png", _png()), "text": (None, "seven"),
                                                    "audio": ("a.wav", b"RIFF\x00\x00")}), 400, "audio",
                                        "undecodable"),
    # issue 13: hostile inputs
    "duplicate JSON keys": (dict(data=b'{"text": "one", "text": "two"}', headers=JSON), 400, "body",
                            "duplicate key"),
    "a 5,000-digit integer": (dict(data=b'{"text": "one", "n": ' + b"9" * 5000 + b"}", headers=JSON), 400,
                              "body", "not valid JSON"),
    "a lone-surrogate key": (dict(data=b'{"\\ud800": 1}', headers=JSON), 422, "\\ud800", "unknown field"),
    "non-UTF-8 multipart text": (dict(files={"text": (None, b"sept \xe9\xff")}), 400, "text",
                                 "not valid UTF-8"),
    "a client disabling the timeout": (dict(json={"text": "one"}, headers={"x-request-timeout-seconds": "0"}),
                                       400, "x-request-timeout-seconds", "reserved"),
    "a client keeping work after it leaves": (dict(json={"text": "one"}, headers={
        "x-request-disconnect-disabled": "?1"}), 400, "x-request-disconnect-disabled", "reserved"),
    "a cross-origin browser POST": (dict(files={"text": (None, "one")}, headers={
        "Origin": "https://evil.example"}), 403, "origin", "cross-origin"),
    "a DNS-rebound Host": (dict(json={"text": "one"}, headers={"Host": "rebound.evil.example:8000"}), 403,
                           "host", "allowed_hosts"),
    "audio declaring 2^31-1 Hz": (dict(files={"audio": ("a.wav", wav_declaring(2**31 - 1))}), 400, "audio",
                                  "outside the accepted range"),
    "the 8000x8000 zero PNG": (dict(files={"image": ("z.png", zero_png(8000, 8000))}), 400, "image",
                               "too large (8000x8000"),
    "an ICO image": (dict(files={"image": ("x.ico", encoded("ICO", sizes=[(16, 16)]))}), 400, "image",
                     "not a recognised image format"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_gets_a_4xx_json_error_naming_the_field(server, case):
    kwargs, status, field, needle = BAD[case]
    r = post(server, **kwargs)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert (err["status"], err["field"]) == (status, field) and needle in err["message"], err
    assert healthy(server)


def test_after_the_bad_inputs_the_server_still_answers(server):
    for kwargs, _, _, _ in BAD.values():  # every bad request again, back to back ...
        assert 400 <= post(server, **kwargs).status_code < 500
    assert healthy(server)
    r = post(server, files={"image": ("x.png", _png()), "text": (None, "sieben")})  # ... then a good one
    assert r.status_code == 200 and r.json()["modalities"] == ["image", "text"]


def test_text_over_the_token_limit_is_truncated_not_rejected(server):
    r = post(server, json={"text": "seven " * 200})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["truncated"] == ["text"] and "truncated to 32 tokens" in body["warnings"][0]
    long_clip = tone(np.random.default_rng(0), 7, seconds=3.0)
    r = post(server, files={"audio": ("a.wav", long_clip), "text": (None, "seven")})
    assert r.status_code == 200 and r.json()["truncated"] == ["audio"]
    assert post(server, json={"text": "seven"}).json()["truncated"] == []


def test_a_modality_the_model_does_not_have(server):
    clip = tone(np.random.default_rng(0), 3)
    r = post(server + "/single", files={"text": (None, "three"), "audio": ("a.wav", clip)}, headers=AUTH)
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["field"] == "audio" and "no audio input" in err["message"] and "image, text" in err["message"]
    r = post(server + "/scale", json={"text": "three"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "text"


def test_api_key(server):
    url = server + "/single"
    for headers in (None, {"Authorization": "Bearer wrong-key-000"}, {"X-API-Key": API_KEY[:-1]}):
        r = post(url, json={"text": "two"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["field"] == "authorization"
        assert r.headers["WWW-Authenticate"] == "Bearer"
    assert requests.get(f"{url}/v1/metadata", timeout=30).status_code == 401
    assert post(url, json={"text": "two"}, headers={"X-API-Key": API_KEY}).status_code == 200
    assert post(url, json={"text": "two"}, headers=AUTH).status_code == 200
    assert healthy(url)  # health checks need no key (load balancers)
    assert post(server, json={"text": "two"}).status_code == 200  # the split app has no key


# ------------------------------------------------------------------------------ metadata and docs


def test_metadata_health_and_openapi(server):
    assert requests.get(f"{server}/healthz", timeout=30).json() == {"status": "ok", "topology": "split"}
    meta = requests.get(f"{server}/v1/metadata", timeout=30).json()
    assert meta["labels"] == [str(i) for i in range(10)] and meta["modalities"] == list(MODALITIES)
    assert meta["topology"] == "split" and meta["max_request_bytes"] == 10 * 1024 * 1024
    assert meta["inputs"]["text"]["max_tokens"] == 32
    assert set(meta["batching"]) == {"image_encoder", "text_encoder", "audio_encoder", "fusion"}
    meta = requests.get(f"{server}/single/v1/metadata", headers=AUTH, timeout=30).json()
    assert meta["topology"] == "single" and meta["modalities"] == ["image", "text"]
    assert "model" in meta["batching"]
    spec = requests.get(f"{server}/openapi.json", timeout=30).json()
    body = spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert set(body) == {"multipart/form-data", "application/json"}
    assert {"400", "413", "415", "422", "503"} <= set(spec["paths"]["/v1/predict"]["post"]["responses"])
    docs = requests.get(f"{server}/docs", timeout=30)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    r = requests.get(f"{server}/v1/nothing-here", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["field"] == "path"


# --------------------------------------------------------------------------------- 4: batching


def _image_batches(url: str) -> Counter:
    hist = requests.get(f"{url}/v1/metadata", timeout=30).json()["batching"]["image_encoder"]["histogram"]
    return Counter({int(k): v for k, v in hist.items()})


def test_concurrent_requests_are_batched(server):
    png = _png()
    bursts = 0
    while bursts < 3:  # bounded: a burst of 64 requests, 16 in flight, up to three times
        bursts += 1
        before = _image_batches(server)
        with ThreadPoolExecutor(16) as pool:
            codes = list(pool.map(lambda _: post(server, files={"image": ("x.png", png)}).status_code,
                                  range(64)))
        assert codes == [200] * 64
        new = _image_batches(server) - before
        assert sum(k * v for k, v in new.items()) == 64  # every request went through the encoder once
        if max(new) > 1:
            break
    assert max(new) > 1, f"no batch larger than 1 in {bursts} bursts: {dict(new)}"


# ----------------------------------------------------------------------------------- overload


def test_overload_gets_503_with_retry_after(server):
    url = server + "/single"
    png = _png()
    results: list[tuple[int, str | None]] = []
    for _ in range(3):  # bounded; the ingress has max_ongoing_requests=2, max_queued_requests=2
        with ThreadPoolExecutor(32) as pool:
            rs = list(pool.map(lambda _: post(url, files={"image": ("x.png", png)}, headers=AUTH), range(96)))
        results += [(r.status_code, r.headers.get("Retry-After")) for r in rs]
        if any(code == 503 for code, _ in results):
            break
    codes = Counter(code for code, _ in results)
    assert set(codes) <= {200, 503} and codes[503] > 0 and codes[200] > 0, codes
    assert {ra for code, ra in results if code == 503} == {"1"}  # backpressure_config.retry_after_s
    assert healthy(url)


# -------------------------------------------------------------------------------- 3: autoscaling


def _running(app: str, name: str) -> int:
    from ray import serve
    from ray.serve.schema import ReplicaState

    return serve.status().applications[app].deployments[name].replica_states.get(ReplicaState.RUNNING, 0)


def _others(app: str, name: str) -> int:
    from ray import serve
    from ray.serve.schema import ReplicaState

    states = serve.status().applications[app].deployments[name].replica_states
    return sum(n for s, n in states.items() if s != ReplicaState.RUNNING)


def test_encoder_autoscales_up_under_a_burst_and_back_down(server):
    url = server + "/scale"
    png = _png()
    assert _running("scale", "ImageEncoder") == 1
    stop = threading.Event()
    codes: Counter = Counter()

    def load() -> None:
        with requests.Session() as s:
            while not stop.is_set():
                codes[s.post(f"{url}/v1/predict", files={"image": ("x.png", png)},
                             timeout=60).status_code] += 1

    workers = [threading.Thread(target=load, daemon=True) for _ in range(16)]
    for w in workers:
        w.start()
    try:
        deadline, peak = time.monotonic() + 120, 1
        while time.monotonic() < deadline and peak < 2:
            peak = max(peak, _running("scale", "ImageEncoder"))
            time.sleep(0.25)
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=60)
    assert peak == 2, f"the encoder never reached 2 running replicas ({dict(codes)} answers)"
    assert codes[200] > 0 and set(codes) == {200}
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and (_running("scale", "ImageEncoder") != 1
                                           or _others("scale", "ImageEncoder")):
        time.sleep(0.5)
    assert (_running("scale", "ImageEncoder"), _others("scale", "ImageEncoder")) == (1, 0)
    assert post(url, files={"image": ("x.png", png)}).status_code == 200


# --------------------------------------------------------------------- 5: hostile inputs and fuzzing


def replica_memory(app: str) -> dict[str, dict[str, float]]:
    """{deployment: {"rss_mib", "peak_mib"}} of each live replica of `app` (same machine: /proc), the
    largest replica per deployment. VmHWM is the process's peak resident set."""
    import ray
    from ray.util.state import list_actors

    out: dict[str, dict[str, float]] = {}
    address = ray.get_runtime_context().gcs_address  # other Ray clusters may run on this machine
    for a in list_actors(address=address, filters=[("state", "=", "ALIVE")], limit=1000):
        prefix = f"ServeReplica:{app}:"
        if not (a.class_name or "").startswith(prefix) or not a.pid:
            continue
        status = Path(f"/proc/{a.pid}/status").read_text()
        kb = {ln.split(":")[0]: int(ln.split()[1]) for ln in status.splitlines() if ln.startswith("Vm")}
        name = a.class_name[len(prefix):]
        mem = {"rss_mib": kb["VmRSS"] / 1024, "peak_mib": kb["VmHWM"] / 1024}
        if name not in out or mem["peak_mib"] > out[name]["peak_mib"]:
            out[name] = mem
    return out


def test_resampling_bombs_over_http_stay_within_the_budget(server):
    """The 1.6 kB WAV declaring 10,001 Hz cost the audio replica 1.3 GB; odd in-range rates are now resampled
    with a bounded kernel (200), and the replica's peak RSS grows by at most the documented 64 MiB."""
    before = replica_memory("mm")["AudioEncoder"]["peak_mib"]
    for rate in (10_001, 50_001, 191_999):
        r = post(server, files={"audio": ("a.wav", wav_declaring(rate, seconds=1.0))})
        assert r.status_code == 200, r.text
    after = replica_memory("mm")["AudioEncoder"]["peak_mib"]
    assert after - before <= 64, (before, after)


FUZZ_CASES = int(os.environ.get("FUZZ_CASES", "300"))  # `make fuzz`: 5,000
# printable ASCII, no surrounding spaces: what `requests` sends (non-UTF-8 header bytes are nginx's job)
_HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40).map(str.strip)


def _mutate(data: bytes, flips: list[tuple[int, int]], cut: int) -> bytes:
    b = bytearray(data[: max(1, cut)] if cut < len(data) else data)
    for pos, val in flips:
        b[pos % len(b)] = val
    return bytes(b)


def _fuzz_strategy():
    rng = np.random.default_rng(0)
    seeds = [_png(), tone(rng, 3), wav_declaring(10_001), wav_declaring(2**31 - 1), wav_declaring(44_100),
             zero_png(5000, 5000), encoded("JPEG"), encoded("GIF"), encoded("ICO", sizes=[(16, 16)]),
             encoded("TIFF"), wav_bytes(np.zeros(800, np.float32)), b"%!PS-Adobe-3.0 EPSF-3.0\n"]
    blob = st.one_of(
        st.sampled_from(seeds),
        st.builds(_mutate, st.sampled_from(seeds), st.lists(st.tuples(st.integers(0, 1 << 16),
                                                                      st.integers(0, 255)), max_size=8),
                  st.integers(1, 1 << 16)),
        st.binary(max_size=1024))
    keys = st.one_of(st.sampled_from(["image", "text", "audio", "label", "", "\ud800", "Image"]),
                     st.text(max_size=8))
    value = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=60),
                      blob.map(lambda b: base64.b64encode(b).decode()),
                      st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                            max_size=2))
    json_body = st.one_of(
        st.dictionaries(keys, value, max_size=4).map(lambda d: json.dumps(d).encode()),
        st.builds(lambda k, a, b: json.dumps({k: a})[:-1].encode() + b", " + json.dumps({k: b})[1:].encode(),
                  keys, value, value),  # a key given twice
        st.binary(max_size=512),
        st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")))
    name_chars = st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters='"\\')
    part_name = st.one_of(st.sampled_from(["image", "text", "audio", "video"]),
                          st.text(name_chars, max_size=8))
    parts = st.lists(st.tuples(part_name, blob, st.booleans()), max_size=4)
    headers = st.dictionaries(
        st.sampled_from(["Content-Type", "Origin", "X-Request-Id", "X-Api-Key", "Authorization", "Accept",
                         "Content-Encoding", "X-Request-Timeout-Seconds", "X-Request-Disconnect-Disabled",
                         "Host", "Transfer-Encoding-Hint"]), _HEADER_TEXT, max_size=2)
    # near-valid requests: the right fields, real or mutated media, so that many cases reach the models
    media = {"image": st.sampled_from([_png(), encoded("JPEG"), encoded("GIF")]) | blob,
             "audio": st.sampled_from([tone(rng, 1), wav_declaring(10_001), wav_declaring(44_100)]) | blob,
             "text": st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass"))}
    fields = st.lists(st.sampled_from(list(media)), min_size=1, max_size=3, unique=True)
    near_parts = fields.flatmap(lambda ms: st.tuples(*(media[m].map(lambda d, m=m: (m, d, m != "text"))
                                                       for m in ms)).map(list))
    near_json = fields.flatmap(lambda ms: st.tuples(*(media[m] for m in ms)).map(lambda vs, ms=ms: json.dumps(
        {m: (v.decode("utf-8", "replace") if m == "text" else base64.b64encode(v).decode())
         for m, v in zip(ms, vs, strict=True)}).encode()))
    return st.one_of(st.tuples(st.just("json"), json_body, headers),
                     st.tuples(st.just("multipart"), parts, headers),
                     st.tuples(st.just("raw"), st.binary(max_size=1024), headers),
                     st.tuples(st.just("multipart"), near_parts, st.just({})),
                     st.tuples(st.just("json"), near_json, st.just({})))


def _fuzz_send(url: str, case: tuple) -> requests.Response:
    kind, payload, headers = case
    if kind == "json":
        return post(url, data=payload, headers={"Content-Type": "application/json", **headers}, timeout=120)
    if kind == "multipart":
        files = [(name, (f"{name}.bin", data) if is_file else (None, data))
                 for name, data, is_file in payload]
        return post(url, files=files or {"text": (None, "")}, headers=headers, timeout=120)
    return post(url, data=payload, headers=headers, timeout=120)


def _reference_answer(url: str) -> dict:
    rng = np.random.default_rng(5)
    r = post(url, files={"image": ("x.png", _png()), "text": (None, "seven"),
                         "audio": ("a.wav", tone(rng, 7))})
    assert r.status_code == 200, r.text
    return r.json()


def test_fuzz_the_contract_over_http(server):
    """Property: whatever the body and headers (JSON, multipart or raw; mutated media, bombs, duplicate
    keys, lone surrogates, Ray's control headers, foreign Origin/Host), the answer is < 500, in the contract's
    shape, and a valid request still gets the same answer before, during (every 100 cases) and after.
    FUZZ_CASES cases (300 in `make test`, 5,000 in `make fuzz`; FUZZ_REPORT=path writes the figures)."""
    reference = _reference_answer(server)
    codes: Counter = Counter()
    errors: Counter = Counter()  # (status, field) of the error answers

    @settings(max_examples=FUZZ_CASES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=_fuzz_strategy())
    def one(case: tuple) -> None:
        r = _fuzz_send(server, case)
        codes[r.status_code] += 1
        assert r.status_code < 500, (case[0], r.status_code, r.text[:300])
        body = r.json()
        if r.status_code == 200:
            assert set(body) == set(reference) and abs(sum(body["probabilities"].values()) - 1) < 1e-4
        else:
            assert set(body) == {"error"} and body["error"]["status"] == r.status_code, body
            errors[f"{r.status_code} {body['error']['field'][:20]}"] += 1
        if sum(codes.values()) % 100 == 0:
            assert _reference_answer(server) == reference

    one()
    assert _reference_answer(server) == reference
    assert sum(codes.values()) >= FUZZ_CASES
    memory = replica_memory("mm")
    report = {"cases": sum(codes.values()), "status_codes": dict(sorted(codes.items())),
              "responses_500_or_more": sum(n for c, n in codes.items() if c >= 500),
              "replica_memory_mib": memory, "errors_by_field": dict(errors.most_common(25))}
    if os.environ.get("FUZZ_REPORT"):
        Path(os.environ["FUZZ_REPORT"]).write_text(json.dumps(report, indent=2) + "\n")
    assert max(m["peak_mib"] for m in memory.values()) < 1536, report  # bounded: no bomb went through
