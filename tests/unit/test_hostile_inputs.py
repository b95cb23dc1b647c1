"""Hostile inputs to the decoders and to the HTTP contract's parsing (issue 13): every one is a DecodeError
or a 4xx RequestError within a documented budget (docs/security.md), never another exception or gigabytes."""

from __future__ import annotations

import io
import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from mmfusion.config import AudioPreprocessConfig
from mmfusion.data.audio import audio_batch, decode_audio
from mmfusion.errors import DecodeError

REPO = Path(__file__).resolve().parents[2]
AUDIO_BOMB_BUDGET_MIB = 64  # docs/security.md: peak RSS a hostile clip may add to an encoder replica


def wav_declaring(rate: int, seconds: float = 0.1, channels: int = 1) -> bytes:
    """A small PCM_16 WAV of a tone whose header declares `rate` (any uint32), as an attacker writes it."""
    n = int(8000 * seconds)
    x = (0.3 * np.sin(2 * np.pi * 440 * np.arange(n) / 8000)).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, np.repeat(x[:, None], channels, axis=1), 8000, format="WAV", subtype="PCM_16")
    b = bytearray(buf.getvalue())
    struct.pack_into("<I", b, 24, rate)  # fmt chunk: sample rate, then byte rate
    struct.pack_into("<I", b, 28, (rate * 2 * channels) & 0xFFFFFFFF)
    return bytes(b)


# ----------------------------------------------------------------------------------------- audio


_RSS_SCRIPT = r"""
import json, resource, sys
import torch
torch.set_num_threads(1)
from mmfusion.config import AudioPreprocessConfig
from mmfusion.data.audio import audio_batch
sys.path.insert(0, sys.argv[1])
from tests.unit.test_hostile_inputs import wav_declaring
cfg = AudioPreprocessConfig(sample_rate=8000, max_seconds=1.0)
audio_batch([wav_declaring(16000), wav_declaring(44100)], cfg)   # warm-up: kernels, allocator, imports
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB
base, out = peak(), {}
for rate in (10_001, 50_001, 191_999, 2**31 - 1):
    _, errors = audio_batch([wav_declaring(rate, seconds=1.0)], cfg)
    out[str(rate)] = {"error": errors[0], "peak_mib": peak()}
print(json.dumps({"base_mib": base, "rates": out}))
"""


def test_resampling_bombs_stay_within_the_memory_budget():
    """A 1.6 kB WAV declaring 10,001 Hz used to cost 1.3 GB (torchaudio's kernel grows with the reduced
    rates), and one declaring 2^31-1 Hz raised RuntimeError (a 500). Measured in a fresh process: ru_maxrss
    is a peak, so each rate's figure is the highest RSS up to and including its call."""
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(REPO)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    for rate, r in res["rates"].items():
        assert r["peak_mib"] - res["base_mib"] <= AUDIO_BOMB_BUDGET_MIB, (rate, res)
    assert "outside the accepted range" in res["rates"][str(2**31 - 1)]["error"]
    assert res["rates"]["10001"]["error"] is None  # an odd but plausible rate is resampled, not refused


@pytest.mark.parametrize("rate", [999, 192_001, 2**31 - 1])  # the range is 1,000..192,000 Hz
def test_sample_rates_outside_the_range_are_a_decode_error(rate):
    with pytest.raises(DecodeError, match="outside the accepted range"):
        decode_audio(wav_declaring(rate))
    with pytest.raises(DecodeError):  # libsndfile refuses this one itself
        decode_audio(wav_declaring(2**32 - 1))


def test_sample_rate_bounds_are_inclusive():
    from mmfusion.data.audio import MAX_SAMPLE_RATE, MIN_SAMPLE_RATE

    assert (MIN_SAMPLE_RATE, MAX_SAMPLE_RATE) == (1_000, 192_000)  # as docs/security.md says
    for rate in (MIN_SAMPLE_RATE, MAX_SAMPLE_RATE):
        wav, sr = decode_audio(wav_declaring(rate))
        assert sr == rate and wav.dtype == np.float32


@pytest.mark.parametrize("rate, target", [(10_001, 8000), (50_001, 8000), (191_999, 16000), (7_919, 16000),
                                          (1_000, 192_000)])
def test_resampling_kernel_is_bounded_and_close_to_the_ratio(rate, target):
    from mmfusion.data.audio import resample_ratio

    orig, new = resample_ratio(rate, target)
    width = math.ceil(6 * orig / (0.99 * min(orig, new)))  # torchaudio's, for its default filter
    assert new * (orig + 2 * width) <= 1.1 * (1 << 20)
    assert abs(new / orig - target / rate) / (target / rate) < 1e-3


@pytest.mark.parametrize("rate, target", [(44_100, 16_000), (22_050, 8_000), (11_025, 16_000),
                                          (48_000, 8_000)])
def test_common_rates_resample_exactly(rate, target):
    from mmfusion.data.audio import resample_ratio

    orig, new = resample_ratio(rate, target)
    assert new / orig == target / rate  # the gcd-reduced rates: as before, bit for bit


def test_resampled_odd_rate_keeps_the_pitch():
    """10,001 Hz resampled to 8 kHz by the approximated ratio: a 440 Hz tone stays at 440 Hz (one FFT bin)."""
    cfg = AudioPreprocessConfig(sample_rate=8000, max_seconds=1.0, normalize="none")
    t = np.arange(10_001) / 10_001
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 10_001, format="WAV")
    import torch

    from mmfusion.data.audio import resample

    wav, sr = decode_audio(buf.getvalue())
    y = resample(torch.from_numpy(wav), sr, 8000).numpy()
    peak_hz = np.argmax(np.abs(np.fft.rfft(y[:8000]))) * 8000 / 8000
    assert abs(peak_hz - 440) <= 1
    _, errors = audio_batch([buf.getvalue()], cfg)
    assert errors == [None]


def test_too_many_channels_and_unlisted_formats_are_refused_before_decoding():
    with pytest.raises(DecodeError, match="channels"):
        decode_audio(wav_declaring(8000, channels=9))
    buf = io.BytesIO()
    sf.write(buf, np.zeros(800, np.float32) + 0.1, 8000, format="AU")  # Sun/NeXT: a valid file, not listed
    with pytest.raises(DecodeError, match="unsupported audio format AU"):
        decode_audio(buf.getvalue())


def test_a_failing_resample_is_a_decode_error(monkeypatch):
    import torchaudio.functional as AF

    def boom(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory")

    monkeypatch.setattr(AF, "resample", boom)
    _, errors = audio_batch([wav_declaring(16_000), wav_declaring(8000)],
                            AudioPreprocessConfig(sample_rate=8000))
    assert errors[0].startswith("cannot resample from 16000 Hz") and errors[1] is None


# ----------------------------------------------------------------------------------------- images


def zero_png(width: int, height: int) -> bytes:
    """A real all-zero grayscale PNG, compressed in chunks (about 190 kB for 8000 x 8000, never 64 MB)."""
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + payload))
        return struct.pack(">I", len(payload)) + kind + payload + crc

    z, row, parts = zlib.compressobj(9), b"\x00" * (width + 1), []  # filter byte + pixels
    for _ in range(height):
        parts.append(z.compress(row))
    parts.append(z.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def encoded(fmt: str, size: tuple[int, int] = (16, 16), mode: str = "RGB", **kw) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size, 128).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _no_decoding(monkeypatch):
    from PIL import ImageFile

    def refuse(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


def test_the_8000_square_zero_png_is_rejected_before_decoding(monkeypatch):
    from mmfusion.data.image import decode_image

    bomb = zero_png(8000, 8000)
    assert len(bomb) < 250_000  # 190 kB on the wire, 64 Mpx (about 1 GB of copies) once decoded
    _no_decoding(monkeypatch)
    with pytest.raises(DecodeError, match=r"too large \(8000x8000 pixels"):
        decode_image(bomb, 3)


def test_the_pixel_limit_is_4096_square():
    from mmfusion.data.image import MAX_IMAGE_PIXELS, decode_image

    assert MAX_IMAGE_PIXELS == 4096 * 4096  # as docs/security.md says
    assert decode_image(zero_png(4096, 4096), 1).shape == (1, 4096, 4096)
    with pytest.raises(DecodeError, match="too large"):
        decode_image(zero_png(4097, 4096), 1)


@pytest.mark.parametrize("fmt, kw", [("ICO", {"sizes": [(16, 16)]}), ("TIFF", {}), ("PPM", {}), ("TGA", {}),
                                     ("PCX", {}), ("DDS", {})])
def test_formats_the_contract_does_not_name_are_not_opened(fmt, kw, monkeypatch):
    """Pillow opens every format it knows unless told otherwise: ICO decoded its embedded PNG before the
    pixel check, EPS would run Ghostscript. Only PNG, JPEG, WebP, GIF and BMP are opened now."""
    from mmfusion.data.image import decode_image

    data = encoded(fmt, mode="RGBA" if fmt == "DDS" else "RGB", **kw)
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        assert im.format == fmt  # a valid image: Pillow would open it without formats=
    _no_decoding(monkeypatch)
    with pytest.raises(DecodeError, match="not a recognised image format"):
        decode_image(data, 3)


def test_eps_never_reaches_ghostscript(monkeypatch):
    import subprocess as sp

    from mmfusion.data.image import decode_image

    def no_subprocess(*a, **k):
        raise AssertionError(f"a subprocess was started: {a}")

    monkeypatch.setattr(sp, "Popen", no_subprocess)
    monkeypatch.setattr(sp, "check_call", no_subprocess)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\nshowpage\n%%EOF\n"
    with pytest.raises(DecodeError, match="not a recognised image format"):
        decode_image(eps, 3)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_the_named_formats_decode(fmt):
    from mmfusion.data.image import decode_image

    assert decode_image(encoded(fmt), 3).shape == (3, 16, 16)


def test_only_the_first_frame_of_an_animation_is_decoded():
    from PIL import Image

    from mmfusion.data.image import decode_image

    frames = [Image.new("L", (8, 8), v) for v in (10, 200, 90)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    img = decode_image(buf.getvalue(), 1)
    assert img.shape == (1, 8, 8) and int(img.float().mean()) == 10


def test_an_unexpected_plugin_exception_is_a_decode_error(monkeypatch):
    from PIL import PngImagePlugin

    from mmfusion.data.image import decode_image

    def broken(self):
        raise IndexError("list index out of range")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load_end", broken)
    with pytest.raises(DecodeError, match="undecodable .IndexError"):
        decode_image(encoded("PNG"), 3)


# ------------------------------------------------------------------------------- the HTTP contract


def _status_of(fn, *args) -> tuple[int, str, bytes]:
    """Call a contract function; -> (status, field, the JSON error body as the ingress would send it)."""
    from fastapi.responses import JSONResponse

    from mmfusion.serving.schemas import RequestError

    try:
        fn(*args)
    except RequestError as e:
        return e.status, e.field, JSONResponse(e.payload(), status_code=e.status).body
    return 200, "", b""


def test_duplicate_json_keys_are_a_400():
    from mmfusion.serving.schemas import parse_json_body

    status, field, body = _status_of(parse_json_body, b'{"text": "one", "text": "seven"}')
    assert (status, field) == (400, "body") and b"duplicate key 'text'" in body


def test_an_integer_of_more_than_4300_digits_is_a_400_not_a_valueerror():
    from mmfusion.serving.schemas import parse_json_body

    status, field, body = _status_of(parse_json_body, b'{"text": "one", "n": ' + b"9" * 5000 + b"}")
    assert (status, field) == (400, "body") and b"not valid JSON" in body


def test_a_lone_surrogate_key_gets_an_error_body_that_encodes():
    """The unknown key is echoed in the error: a lone surrogate broke the answer's UTF-8 encoding (a 500)."""
    from mmfusion.serving.schemas import parse_json_body

    status, field, body = _status_of(parse_json_body, b'{"\\ud800": 1}')
    assert status == 422 and field == "\\ud800"
    assert json.loads(body)["error"]["field"] == "\\ud800"
    status, field, _ = _status_of(parse_json_body, b'{"text": "a\\udfffb"}')  # a text the tokenizers reject
    assert (status, field) == (400, "text")


def test_a_non_utf8_multipart_text_field_is_a_400():
    """Starlette decodes a plain form field that is not UTF-8 as latin-1: the request was answered 200."""
    import asyncio

    from starlette.requests import Request

    from mmfusion.serving.http import multipart_parts
    from mmfusion.serving.schemas import inputs_from_parts

    body = (b'--b\r\nContent-Disposition: form-data; name="text"\r\n\r\nsept \xe9\xff\r\n--b--\r\n')
    scope = {"type": "http", "method": "POST", "path": "/v1/predict",
             "headers": [(b"content-type", b"multipart/form-data; boundary=b")]}
    parts = asyncio.run(multipart_parts(Request(scope), body, 1 << 20))
    status, field, msg = _status_of(inputs_from_parts, parts)
    assert (status, field) == (400, "text") and b"not valid UTF-8 (byte 0xe9" in msg
    good = body.replace(b"sept \xe9\xff", "sept é".encode())
    assert inputs_from_parts(asyncio.run(multipart_parts(Request(scope), good, 1 << 20))).text == "sept é"


@pytest.mark.parametrize("name", ["x-request-timeout-seconds", "X-Request-Disconnect-Disabled"])
def test_rays_control_headers_are_refused(name):
    """Ray's proxy reads them from the client (a timeout of 0 disables the server's); the ingress refuses the
    request before any work."""
    from mmfusion.serving.guards import check_client_headers

    status, field, _ = _status_of(check_client_headers, ["host", name])
    assert (status, field) == (400, name.lower())
    assert _status_of(check_client_headers, ["host", "x-request-id", "content-type"])[0] == 200


def test_cross_origin_requests_are_refused_by_default():
    from mmfusion.serving.guards import check_origin

    assert _status_of(check_origin, None, "127.0.0.1:8000", [])[0] == 200  # curl, SDKs: no Origin
    assert _status_of(check_origin, "http://127.0.0.1:8000", "127.0.0.1:8000", [])[0] == 200  # /docs
    assert _status_of(check_origin, "https://evil.example", "127.0.0.1:8000", [])[:2] == (403, "origin")
    assert _status_of(check_origin, "null", "127.0.0.1:8000", [])[0] == 403  # sandboxed iframes, file://
    assert _status_of(check_origin, "https://app.example", "api:8000", ["https://app.example"])[0] == 200
    assert _status_of(check_origin, "https://any.example", "api:8000", ["*"])[0] == 200


def test_the_host_allow_list_stops_dns_rebinding():
    from mmfusion.serving.guards import check_host

    local = ["127.0.0.1", "localhost", "::1"]
    for host in ("127.0.0.1:8000", "localhost", "LOCALHOST:80", "[::1]:8000"):
        assert _status_of(check_host, host, local)[0] == 200, host
    for host in ("evil.example:8000", None, ""):
        assert _status_of(check_host, host, local)[:2] == (403, "host"), host
    assert _status_of(check_host, "anything:1", None)[0] == 200  # no list: any Host


def test_the_ingress_timeout_must_be_below_the_proxys():
    import yaml

    from mmfusion.errors import ConfigError
    from mmfusion.serving.config import check_serve_config

    raw = yaml.safe_load((REPO / "serve" / "local.yaml").read_text())
    check_serve_config(raw)
    args = raw["applications"][0].setdefault("args", {})
    args["request_timeout_s"] = raw["http_options"]["request_timeout_s"]
    with pytest.raises(ConfigError, match="request_timeout_s=30 must be below"):
        check_serve_config(raw)
