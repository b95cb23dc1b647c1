"""The ingress's own logic without Ray: its deadline, and how it answers when a model replica fails or dies
(issue 13). The deployment class is instantiated without Serve, with fake handles for the model replicas."""

from __future__ import annotations

import asyncio
import base64
import json
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from starlette.requests import Request

from mmfusion.serving.deployments import Ingress
from mmfusion.serving.messages import Encoded
from mmfusion.serving.schemas import RequestError, ServeArgs


class FakeMethod:
    def __init__(self, fn) -> None:
        self.fn = fn

    def remote(self, *args: Any) -> Any:
        return self.fn(*args)


def handle(**methods) -> SimpleNamespace:
    return SimpleNamespace(**{k: FakeMethod(v) for k, v in methods.items()})


class BareIngress(Ingress.func_or_class):  # type: ignore[misc,name-defined]
    def __del__(self) -> None:  # Serve's wrapper has an async __del__ for its ASGI app, never started here
        pass


def ingress(encode=None, fuse=None, **args) -> Any:
    """An Ingress replica (split topology, text only) without Serve: fake encoder and fusion handles."""
    async def ok_encode(value):
        return Encoded(embedding=np.ones(4, np.float32))

    async def ok_fuse(items):
        return np.array([0.25, 0.75], np.float32)

    ing = object.__new__(BareIngress)
    ing.args = ServeArgs(artifact="/nowhere", **args)
    ing.info = SimpleNamespace(modalities=["text"], labels=["a", "b"])
    ing.api_key = None
    ing.encoders = {"text": handle(encode=encode or ok_encode)}
    ing.fusion = handle(fuse=fuse or ok_fuse)
    ing.model = None
    return ing


def request(body: bytes = b'{"text": "one"}', headers: dict[str, str] | None = None,
            delay_s: float = 0.0) -> Request:
    """A POST /v1/predict whose body arrives after `delay_s` (a slow client)."""
    hdrs = {"content-type": "application/json", "host": "127.0.0.1:8000", **(headers or {})}
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            await asyncio.sleep(3600)
        sent = True
        await asyncio.sleep(delay_s)
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/v1/predict",
             "headers": [(k.encode(), v.encode()) for k, v in hdrs.items()]}
    return Request(scope, receive)


def answer(ing: Any, req: Request) -> tuple[int, dict, dict]:
    """(status, JSON body, headers) as the ingress answers; bounded at 5 s so that a hang fails the test."""
    async def go():
        return await asyncio.wait_for(ing.predict(req), 5.0)

    try:
        r = asyncio.run(go())
    except RequestError as e:
        return e.status, e.payload(), e.headers
    return r.status_code, json.loads(r.body), dict(r.headers)


def test_a_good_request():
    status, body, _ = answer(ingress(), request())
    assert status == 200 and body["label"] == "b" and body["modalities"] == ["text"]


def test_the_ingress_deadline_holds_whatever_the_client_sends():
    """A body that trickles in longer than request_timeout_s: a JSON 408 from the ingress (Ray's proxy, told
    `x-request-timeout-seconds: 0` by a client, would wait forever). Models that do not answer in time (all
    replicas of a deployment restarting): a 503 with Retry-After, which clients retry."""
    status, body, _ = answer(ingress(request_timeout_s=0.2), request(delay_s=30))
    assert status == 408 and body["error"]["field"] == "body" and "0.2 s" in body["error"]["message"]

    async def slow_encode(value):
        await asyncio.sleep(30)

    status, body, headers = answer(ingress(encode=slow_encode, request_timeout_s=0.2), request())
    assert status == 503 and headers["Retry-After"] == "1" and "did not answer within 0.2 s" in str(body)


def test_a_dead_replica_is_a_503_with_retry_after():
    from ray.exceptions import ActorDiedError

    async def dead(value):
        raise ActorDiedError()

    status, body, headers = answer(ingress(encode=dead, retry_after_s=2), request())
    assert status == 503 and headers["Retry-After"] == "2"
    assert "ActorDiedError" in body["error"]["message"]


def test_an_exception_in_a_replica_is_a_503_with_retry_after():
    async def broken(items):
        raise RuntimeError("CUDA error: device-side assert triggered")

    status, body, headers = answer(ingress(fuse=broken), request())
    assert status == 503 and headers["Retry-After"] == "1" and body["error"]["field"] == "server"


def test_a_row_the_encoder_failed_on_is_a_503_with_retry_after():
    async def failed_row(value):
        return Encoded(error="the text encoder failed (RuntimeError); retry later", status=503)

    async def failed_fusion(items):
        return None

    status, body, headers = answer(ingress(encode=failed_row), request())
    assert (status, body["error"]["field"], headers.get("Retry-After")) == (503, "text", "1")
    status, _, headers = answer(ingress(fuse=failed_fusion), request())
    assert status == 503 and headers.get("Retry-After") == "1"


@pytest.mark.parametrize("headers, status, field", [
    ({"x-request-timeout-seconds": "0"}, 400, "x-request-timeout-seconds"),
    ({"x-request-disconnect-disabled": "?1"}, 400, "x-request-disconnect-disabled"),
    ({"origin": "https://evil.example"}, 403, "origin"),
])
def test_refused_before_any_work(headers, status, field):
    calls = []

    async def counting(value):
        calls.append(value)
        return Encoded(embedding=np.ones(4, np.float32))

    got, body, _ = answer(ingress(encode=counting), request(headers=headers))
    assert (got, body["error"]["field"]) == (status, field) and calls == []


def test_an_allowed_origin_gets_the_cors_header():
    ing = ingress(allowed_origins=["https://app.example"])
    status, _, headers = answer(ing, request(headers={"origin": "https://app.example"}))
    assert status == 200 and headers["access-control-allow-origin"] == "https://app.example"


def test_the_host_allow_list():
    ing = ingress(allowed_hosts=["127.0.0.1", "localhost"])
    assert answer(ing, request())[0] == 200
    status, body, _ = answer(ing, request(headers={"host": "rebound.evil.example:8000"}))
    assert (status, body["error"]["field"]) == (403, "host")


def test_the_error_body_of_a_hostile_key_encodes():
    body = json.dumps({"\ud800": base64.b64encode(b"x").decode()}).encode()
    status, payload, _ = answer(ingress(), request(body=body))
    assert status == 422
    from fastapi.responses import JSONResponse

    assert b"\\\\ud800" in JSONResponse(payload).body  # rendered, as UTF-8, without an exception


# ------------------------------------------------------------------------- monolith: the model in the ingress


class FakeRunner:
    """ModelRunner's interface: rows of raw inputs -> one Predicted each; records the batches it got."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.batches: list[int] = []
        self.probes = 0
        self.fail = fail

    def __call__(self, items: list[dict[str, Any]]) -> list[Any]:
        from mmfusion.serving.messages import Predicted

        if self.fail is not None:
            raise self.fail
        self.batches.append(len(items))
        return [Predicted(error="not UTF-8", modality="text", status=400) if it["text"] == "bad"
                else Predicted(probabilities=np.array([0.9, 0.1], np.float32)) for it in items]

    def probe(self) -> None:
        self.probes += 1


def monolith(runner: FakeRunner, monkeypatch) -> Any:
    from ray import serve

    from mmfusion.serving import metrics as sm

    monkeypatch.setattr(sm, "_metrics", SimpleNamespace(batch=SimpleNamespace(observe=lambda n: None)))
    replica = SimpleNamespace(_deployment_config=SimpleNamespace(max_ongoing_requests=64))
    monkeypatch.setattr(serve, "get_replica_context", lambda: replica)  # @serve.batch reads it; no Serve here
    # @serve.batch keeps one queue per decorated function and process, bound to the first event loop that
    # used it (one replica: one loop); each test here runs its own loop, so it gets a fresh queue and knobs
    lazy = Ingress.func_or_class.predict_rows.set_max_batch_size.__self__
    for attr in ("_queue", "max_batch_size", "batch_wait_timeout_s"):
        monkeypatch.setattr(lazy, attr, None if attr == "_queue" else getattr(lazy, attr))
    ing = ingress(topology="monolith")
    ing.encoders, ing.fusion, ing.backends = {}, None, {}
    ing.runner, ing.stats = runner, sm.BatchSizes()
    return ing


def test_the_monolith_batches_concurrent_requests_in_its_own_replica(monkeypatch):
    runner = FakeRunner()
    ing = monolith(runner, monkeypatch)
    ing.reconfigure({"max_batch_size": 4, "batch_wait_timeout_s": 0.2})

    async def go():
        texts = ["one", "two", "bad", "four", "five"]
        return await asyncio.gather(*(ing.predict(request(json.dumps({"text": t}).encode()))
                                      for t in texts), return_exceptions=True), await ing._batch_stats()

    results, stats = asyncio.run(go())
    assert runner.batches == [4, 1]  # max_batch_size from user_config, the fifth waits for the next batch
    assert [stats[0]["batches"], stats[0]["rows"], stats[0]["max_batch"]] == [2, 5, 4]
    ok = [json.loads(r.body) for r in results if not isinstance(r, Exception)]
    assert len(ok) == 4 and all(b["label"] == "a" for b in ok)
    [err] = [r for r in results if isinstance(r, Exception)]
    assert isinstance(err, RequestError) and (err.status, err.field) == (400, "text")  # the row's own error
    ing.check_health()
    assert runner.probes == 1


def test_an_exception_in_the_monoliths_model_is_a_503_with_retry_after(monkeypatch):
    ing = monolith(FakeRunner(fail=RuntimeError("CUDA error")), monkeypatch)
    status, body, headers = answer(ing, request())
    assert status == 503 and headers["Retry-After"] == "1" and body["error"]["field"] == "server"
