"""Request parsing and validation of the serving HTTP contract (pure: no Ray, no torch, no server)."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import pytest
from pydantic import ValidationError

from mmfusion.errors import ConfigError
from mmfusion.serving.batching import BatchConfig, BatchStats
from mmfusion.serving.schemas import (
    FormPart,
    Inputs,
    RequestError,
    ServeArgs,
    check_api_key,
    check_length,
    check_modalities,
    content_kind,
    decode_base64,
    inputs_from_parts,
    parse_json_body,
)

PNG = b"\x89PNG\r\n\x1a\n fake"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def raises(status: int, field: str, fn, *args):
    with pytest.raises(RequestError) as info:
        fn(*args)
    assert (info.value.status, info.value.field) == (status, field), info.value
    return info.value


@pytest.mark.parametrize("ct, kind", [
    ("application/json", "json"), ("application/json; charset=utf-8", "json"), ("Application/JSON", "json"),
    ("application/vnd.api+json", "json"), ("multipart/form-data; boundary=abc", "multipart"),
])
def test_content_kind_accepts_json_and_multipart(ct, kind):
    assert content_kind(ct) == kind


@pytest.mark.parametrize("ct, status", [
    (None, 415), ("", 415), ("text/plain", 415), ("application/x-www-form-urlencoded", 415),
    ("image/png", 415), ("multipart/form-data", 400),  # no boundary: cannot be parsed
])
def test_content_kind_rejects_others(ct, status):
    err = raises(status, "content-type", content_kind, ct)
    assert "application/json" in err.message or "boundary" in err.message


def test_check_length():
    check_length(None, 100)
    check_length("100", 100)
    assert "limit is 100" in raises(413, "body", check_length, "101", 100).message
    raises(400, "content-length", check_length, "ten", 100)


def test_json_body_with_every_modality():
    body = json.dumps({"image": b64(PNG), "text": "seven", "audio": b64(b"RIFF....WAVE")}).encode()
    inputs = parse_json_body(body)
    assert inputs == Inputs(image=PNG, text="seven", audio=b"RIFF....WAVE")
    assert inputs.given() == ["image", "text", "audio"]


def test_json_body_subsets_and_nulls():
    assert parse_json_body(b'{"text": "two"}').given() == ["text"]
    assert parse_json_body(json.dumps({"image": b64(PNG), "audio": None}).encode()).given() == ["image"]
    assert parse_json_body(b'{"text": ""}').given() == []  # an empty text is no text, as in the training data


def test_base64_variants():
    wrapped = "\n".join(b64(PNG * 20)[i:i + 76] for i in range(0, len(b64(PNG * 20)), 76))  # MIME line breaks
    assert decode_base64("image", wrapped) == PNG * 20
    assert decode_base64("image", "data:image/png;base64," + b64(PNG)) == PNG
    assert decode_base64("image", None) is None


@pytest.mark.parametrize("body, status, field, needle", [
    (b"", 400, "body", "empty"),
    (b"   \n", 400, "body", "empty"),
    (b"{not json", 400, "body", "not valid JSON"),
    (b"\xff\xfe{}", 400, "body", "UTF-8"),
    (b"[1, 2]", 422, "body", "got array"),
    (b'"text"', 422, "body", "got string"),
    (b'{"video": "abc"}', 422, "video", "unknown field 'video'"),
    (b'{"text": "x", "label": 3}', 422, "label", "allowed: image, text, audio"),
    (b'{"text": 5}', 422, "text", "expected a string, got number"),
    (b'{"image": 12}', 422, "image", "expected a base64 string"),
    (b'{"image": "not base64!"}', 400, "image", "invalid base64"),
    (b'{"audio": "abc"}', 400, "audio", "invalid base64"),  # bad padding
    (b'{"audio": ["AAAA"]}', 422, "audio", "got array"),
    (b"[" * 100_000 + b"]" * 100_000, 400, "body", "nested too deeply"),
])
def test_json_body_errors_name_the_field(body, status, field, needle):
    err = raises(status, field, parse_json_body, body)
    assert needle in err.message
    assert err.payload() == {"error": {"status": status, "field": field, "message": err.message}}


def test_multipart_parts():
    parts = [FormPart("image", PNG, True), FormPart("text", "nine", False)]
    assert inputs_from_parts(parts) == Inputs(image=PNG, text="nine")
    assert inputs_from_parts([FormPart("text", b"neuf", True)]).text == "neuf"  # text as a file


@pytest.mark.parametrize("parts, status, field, needle", [
    ([], 400, "body", "empty multipart"),
    ([FormPart("picture", PNG, True)], 422, "picture", "unknown field"),
    ([FormPart("image", PNG, True), FormPart("image", PNG, True)], 422, "image", "more than once"),
    ([FormPart("image", "iVBORw0KGgo=", False)], 422, "image", "file upload"),
    ([FormPart("audio", "a path/to/file.wav", False)], 422, "audio", "file upload"),
    ([FormPart("text", b"\xffabc", True)], 400, "text", "UTF-8"),
])
def test_multipart_errors_name_the_field(parts, status, field, needle):
    assert needle in raises(status, field, inputs_from_parts, parts).message


def test_check_modalities():
    assert check_modalities(Inputs(image=PNG, text="x"), ["image", "text", "audio"]) == ["image", "text"]
    err = raises(422, "body", check_modalities, Inputs(), ["image", "text"])
    assert "at least one of image, text" in err.message
    raises(422, "body", check_modalities, Inputs(text=""), ["image", "text"])
    err = raises(422, "audio", check_modalities, Inputs(image=PNG, audio=b"RIFF"), ["image", "text"])
    assert "no audio input" in err.message and "image, text" in err.message


def test_api_key():
    check_api_key(None, None, None)  # auth off
    check_api_key("s3cret-key", "Bearer s3cret-key", None)
    check_api_key("s3cret-key", "bearer  s3cret-key", None)
    check_api_key("s3cret-key", None, "s3cret-key")
    for auth, x in [(None, None), ("Bearer wrong-key", None), ("Basic s3cret-key", None),
                    (None, "s3cret-ke")]:
        err = raises(401, "authorization", check_api_key, "s3cret-key", auth, x)
        assert err.headers == {"WWW-Authenticate": "Bearer"}


def test_serve_args(monkeypatch):
    a = ServeArgs(artifact="/a")
    assert (a.topology, a.max_request_bytes, a.resolve_api_key()) == ("split", 10 * 1024 * 1024, None)
    assert ServeArgs(artifact="/a", api_key="0123456789").resolve_api_key() == "0123456789"
    assert "0123456789" not in repr(ServeArgs(artifact="/a", api_key="0123456789"))  # SecretStr hides it
    monkeypatch.setenv("MMF_TEST_KEY", "from-the-env-123")
    assert ServeArgs(artifact="/a", api_key_env="MMF_TEST_KEY").resolve_api_key() == "from-the-env-123"
    with pytest.raises(ConfigError, match="MMF_UNSET_KEY"):
        ServeArgs(artifact="/a", api_key_env="MMF_UNSET_KEY").resolve_api_key()
    with pytest.raises(ConfigError, match="at least 8"):
        ServeArgs(artifact="/a", api_key="short").resolve_api_key()
    with pytest.raises(ValidationError, match="topolgy"):
        ServeArgs(artifact="/a", topolgy="single")  # a typo is an error, not ignored
    with pytest.raises(ValidationError):
        ServeArgs(artifact="/a", topology="one-big-replica")


def test_batch_config_and_stats():
    assert BatchConfig().max_batch_size >= 1
    with pytest.raises(ValidationError):
        BatchConfig(max_batch_size=0)
    with pytest.raises(ValidationError):
        BatchConfig(max_batch_sise=8)
    s = BatchStats()
    assert s.as_dict() == {"batches": 0, "rows": 0, "max_batch": 0, "mean_batch": 0.0, "histogram": {}}
    for n in (1, 4, 4, 3):
        s.add(n)
    assert s.as_dict() == {"batches": 4, "rows": 12, "max_batch": 4, "mean_batch": 3.0,
                           "histogram": {"1": 1, "3": 1, "4": 2}}


def test_the_ingress_side_never_imports_torch():
    """The ingress replica imports these (and unpickles messages.* from the model replicas): no torch
    there."""
    code = ("import sys, mmfusion.serving.deployments, mmfusion.serving.messages, mmfusion.serving.app, "
            "mmfusion.serving.client; assert 'torch' not in sys.modules, 'torch imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
