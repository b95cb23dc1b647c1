"""The HTTP contract of the serving app (DESIGN.md section 7): app arguments, request parsing and validation,
response and error bodies. Pure Python (pydantic, stdlib): no Ray, no torch, so it is unit-tested directly.

    POST /v1/predict   multipart/form-data: files `image`, `audio`, field (or file) `text`
                       application/json:    {"image": "<base64>", "audio": "<base64>", "text": "..."}
                       any non-empty subset of the model's modalities
        200 -> Prediction {label, index, probabilities, modalities, truncated, warnings}
        4xx -> {"error": {"status", "field", "message"}}   (400 undecodable, 401 key, 413 size, 415 type,
                                                            422 shape)
    GET /v1/metadata, GET /healthz, OpenAPI at /docs

Every client mistake becomes a `RequestError` naming the field at fault; the ingress turns it into JSON.
The server never reads a path or URL given by a client: media arrive as bytes, and only as bytes.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from mmfusion.batch import MEDIA, MODALITIES
from mmfusion.errors import ConfigError

DEFAULT_MAX_REQUEST_BYTES = 10 * 1024 * 1024
_DATA_URL = re.compile(r"^data:[\w.+-]+/[\w.+-]+(;[\w.+-]+=[\w.+-]+)*;base64,", re.IGNORECASE)


# ------------------------------------------------------------------------------------------ app args


class ServeArgs(BaseModel):
    """The `args:` of a Serve config application (validated by Serve against this model, unknown keys
    fail)."""

    model_config = ConfigDict(extra="forbid")

    artifact: str  # artifact folder (absolute, or on shared storage on a cluster) or a URI (s3://, gs://, file://)
    # split: one deployment per encoder + fusion; single: ingress -> one model deployment; monolith: the
    # model inside the ingress replica (one deployment, one hop fewer; the ingress then needs torch)
    topology: Literal["split", "single", "monolith"] = "split"
    max_request_bytes: int = Field(DEFAULT_MAX_REQUEST_BYTES, ge=1024, le=1024**3)  # larger bodies get 413
    api_key: SecretStr | None = None  # clients must send it (Authorization: Bearer KEY or X-API-Key: KEY)
    api_key_env: str | None = None  # or: the name of an environment variable on the nodes that holds the key
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when the replica was given a GPU
    torch_threads: int | None = Field(None, ge=1)  # intra-op threads per model replica; None: torch's default
    retry_after_s: int = Field(1, ge=0, le=3600)  # Retry-After on a 503 when an encoder's queue is full
    # the ingress's own deadline for one request (JSON 408 after it), whatever the client's headers say; keep
    # it below http_options.request_timeout_s so that clients get this JSON answer, not the proxy's plain one
    request_timeout_s: float = Field(15.0, gt=0, le=3600)
    # browsers: requests whose Origin is neither the server's own nor listed here get 403 (no CORS by default)
    allowed_origins: list[str] = []
    # Host header allow-list (hostnames, no port) against DNS rebinding; None: any. `mmfusion serve` on a
    # loopback address fills in localhost names (serving.config.prepare_config)
    allowed_hosts: list[str] | None = None

    def resolve_api_key(self) -> str | None:
        """The key clients must present, or None (no auth). Raises ConfigError if api_key_env is unset."""
        if self.api_key is not None and self.api_key_env:
            raise ConfigError("give api_key or api_key_env, not both")
        if self.api_key is not None:
            key = self.api_key.get_secret_value()
        elif self.api_key_env:
            key = os.environ.get(self.api_key_env, "")
            if not key:
                raise ConfigError(f"api_key_env={self.api_key_env!r}: that environment variable is not set "
                                  "(or is empty) on this node")
        else:
            return None
        if not key.strip() or len(key) < 8:
            raise ConfigError("the API key must have at least 8 characters")
        return key


# ------------------------------------------------------------------------------------------- errors


class RequestError(Exception):
    """A client mistake: HTTP status, the field at fault ("image", "body", "content-type", ...), a message."""

    def __init__(self, status: int, field: str, message: str, headers: dict[str, str] | None = None) -> None:
        field, message = printable(field, 64), printable(message, 1000)
        super().__init__(f"{status} {field}: {message}")
        self.status = status
        self.field = field
        self.message = message
        self.headers = headers or {}

    def payload(self) -> dict[str, Any]:
        return {"error": {"status": self.status, "field": self.field, "message": self.message}}


def printable(s: str, limit: int) -> str:
    """A client-supplied string made safe to echo in a JSON error: lone surrogates and other unencodable
    characters as escapes (the response must encode as UTF-8), cut to `limit` characters."""
    s = s.encode("utf-8", "backslashreplace").decode("utf-8")
    return s if len(s) <= limit else s[:limit] + "..."


class ErrorBody(BaseModel):
    status: int
    field: str  # the request part at fault: image | text | audio | body | content-type | authorization | ...
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


# ------------------------------------------------------------------------------------------ request


@dataclass(frozen=True)
class Inputs:
    """One request's raw inputs: encoded media bytes and text, exactly as the client sent them."""

    image: bytes | None = None
    text: str | None = None
    audio: bytes | None = None

    def given(self) -> list[str]:
        """Modalities present, canonical order; an empty text is a missing text (as in training data)."""
        out = []
        for m in MODALITIES:
            v = getattr(self, m)
            if v is not None and not (m == "text" and v == ""):
                out.append(m)
        return out

    def values(self) -> dict[str, bytes | str]:
        return {m: getattr(self, m) for m in self.given()}


class PredictJSON(BaseModel):
    """JSON request body (documented in OpenAPI; parsed by `parse_json_body` for exact error messages)."""

    model_config = ConfigDict(extra="forbid")

    image: str | None = Field(None, description="base64 of an encoded image (PNG, JPEG, ...); "
                                                "data: URLs accepted")
    text: str | None = Field(None, description="the text, UTF-8")
    audio: str | None = Field(None, description="base64 of an encoded clip (WAV, FLAC, OGG)")


def content_kind(content_type: str | None) -> Literal["json", "multipart"]:
    """Content-Type -> "json" | "multipart"; anything else is a 415."""
    if not content_type:
        raise RequestError(415, "content-type",
                           "missing Content-Type: send application/json or multipart/form-data")
    main = content_type.split(";", 1)[0].strip().lower()
    if main == "application/json" or (main.startswith("application/") and main.endswith("+json")):
        return "json"
    if main == "multipart/form-data":
        if "boundary=" not in content_type.lower():
            raise RequestError(400, "content-type", "multipart/form-data without a boundary parameter")
        return "multipart"
    raise RequestError(415, "content-type",
                       f"unsupported Content-Type {main!r}: send application/json or multipart/form-data")


def check_length(content_length: str | None, limit: int) -> None:
    """Reject a declared body size above the limit before reading it (413)."""
    if content_length is None:
        return
    try:
        n = int(content_length)
    except ValueError:
        raise RequestError(400, "content-length", f"not an integer: {content_length!r}") from None
    if n > limit:
        raise RequestError(413, "body", f"request body is {n} bytes; the limit is {limit} bytes")


def _type_name(v: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(v), type(v).__name__)


def decode_base64(field: str, value: Any) -> bytes | None:
    """A JSON media field -> bytes. Accepts standard base64 (line breaks ignored) or a data: URL."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise RequestError(422, field, f"expected a base64 string, got {_type_name(value)}")
    s = _DATA_URL.sub("", value.strip(), count=1)
    s = "".join(s.split())  # MIME-style base64 wraps lines
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(400, field, f"invalid base64 ({e})") from None


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object_pairs_hook: a key given twice is an error (json.loads would keep the last silently)."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def check_utf8_text(text: str) -> None:
    """400 when a text cannot be UTF-8 (a lone surrogate from a JSON \\ud800 escape): the tokenizers fail."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(400, "text", f"not valid Unicode (lone surrogate at position {e.start})") from None


def parse_json_body(body: bytes) -> Inputs:
    """A JSON request body -> Inputs. 400: empty, not JSON, bad base64; 422: wrong shape, unknown field,
    type."""
    if not body.strip():
        raise RequestError(400, "body",
                           "empty request body: send a JSON object with image, text and/or audio")
    try:
        # JSON is UTF-8 (RFC 8259); json.loads would guess UTF-16/32
        obj = json.loads(body.decode("utf-8-sig"), object_pairs_hook=_no_duplicate_keys)
    except UnicodeDecodeError as e:
        raise RequestError(400, "body", f"the JSON body is not valid UTF-8 (byte 0x{body[e.start]:02x} at "
                                        f"position {e.start})") from None
    except json.JSONDecodeError as e:
        raise RequestError(400, "body",
                           f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise RequestError(400, "body", "JSON nested too deeply") from None
    except _DuplicateKey as e:
        raise RequestError(400, "body", f"duplicate key {e.key!r} in a JSON object") from None
    except ValueError as e:  # an integer of more than 4,300 digits (sys.set_int_max_str_digits), ...
        raise RequestError(400, "body", f"not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise RequestError(422, "body",
                           f"expected a JSON object with image, text and/or audio, got {_type_name(obj)}")
    for k in obj:
        if k not in MODALITIES:
            raise RequestError(422, str(k), f"unknown field {str(k)!r}; allowed: {', '.join(MODALITIES)}")
    text = obj.get("text")
    if text is not None and not isinstance(text, str):
        raise RequestError(422, "text", f"expected a string, got {_type_name(text)}")
    if text is not None:
        check_utf8_text(text)
    return Inputs(image=decode_base64("image", obj.get("image")), text=text,
                  audio=decode_base64("audio", obj.get("audio")))


@dataclass(frozen=True)
class FormPart:
    """One multipart part: its field name, its content, and whether it was sent as a file upload."""

    name: str
    data: bytes | str
    is_file: bool


def inputs_from_parts(parts: Sequence[FormPart]) -> Inputs:
    """Multipart parts -> Inputs. image/audio must be file uploads; text is a plain field or a UTF-8 file."""
    if not parts:
        raise RequestError(400, "body", "empty multipart body: send image, text and/or audio fields")
    seen: dict[str, bytes | str] = {}
    for p in parts:
        if p.name not in MODALITIES:
            raise RequestError(422, p.name or "body",
                               f"unknown field {p.name!r}; allowed: {', '.join(MODALITIES)}")
        if p.name in seen:
            raise RequestError(422, p.name, "given more than once")
        if p.name in MEDIA:
            if not p.is_file:
                raise RequestError(422, p.name, f"send {p.name} as a file upload (curl -F {p.name}=@FILE), "
                                                "or as base64 in a JSON body")
            seen[p.name] = bytes(p.data) if not isinstance(p.data, str) else p.data.encode()
        else:
            data = p.data
            if isinstance(data, (bytes, bytearray)):
                try:
                    data = bytes(data).decode("utf-8")
                except UnicodeDecodeError as e:
                    raise RequestError(400, "text", f"not valid UTF-8 (byte 0x{data[e.start]:02x} at "
                                                    f"position {e.start})") from None
            seen[p.name] = data
    return Inputs(image=seen.get("image"), text=seen.get("text"), audio=seen.get("audio"))  # type: ignore[arg-type]


def check_modalities(inputs: Inputs, supported: Sequence[str]) -> list[str]:
    """The modalities to use, canonical order. 422 when none is given or the model lacks one that is."""
    given = inputs.given()
    if not given:
        raise RequestError(422, "body", "no modality given: send at least one of "
                                        f"{', '.join(supported)} (an empty text counts as no text)")
    for m in given:
        if m not in supported:
            raise RequestError(422, m, f"this model has no {m} input; it accepts: {', '.join(supported)}")
    return given


def check_api_key(expected: str | None, authorization: str | None, x_api_key: str | None) -> None:
    """401 unless the request carries the key (constant-time comparison)."""
    if expected is None:
        return
    got = x_api_key
    if got is None and authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer":
            got = token.strip()
    if not got or not hmac.compare_digest(got.encode(), expected.encode()):
        raise RequestError(401, "authorization", "missing or wrong API key: send 'Authorization: Bearer KEY' "
                                                 "or 'X-API-Key: KEY'",
                           headers={"WWW-Authenticate": "Bearer"})


# ----------------------------------------------------------------------------------------- response


class Prediction(BaseModel):
    label: str  # the most probable class
    index: int  # its position in the labels list (GET /v1/metadata)
    probabilities: dict[str, float]  # per class, in label order; sums to 1
    modalities: list[str]  # the inputs the prediction used
    truncated: list[str] = []  # inputs cut to the model's limits (text tokens, audio seconds); not an error
    warnings: list[str] = []  # what was cut, and how


class Health(BaseModel):
    status: Literal["ok"]
    topology: str


class Metadata(BaseModel):
    name: str  # the artifact folder's name
    topology: str
    labels: list[str]
    modalities: list[str]
    encoders: dict[str, str]  # modality -> encoder name
    fusion: str
    inputs: dict[str, dict[str, Any]]  # the preprocessing limits per modality (image size, text tokens, ...)
    max_request_bytes: int
    metrics: dict[str, Any]  # the artifact's recorded evaluation (accuracy, macro-F1 per split), if any
    batching: dict[str, dict[str, Any]]  # per batched deployment: batch-size histogram of the replica asked
