"""Property-based fuzzing of the record readers and the preprocessors with random and mutated bytes (issue
13): each returns a reason for what it cannot use, or raises DecodeError (a whole unreadable file:
DataError), and never anything else. 150 cases per test; the HTTP fuzz is tests/e2e/test_serve.py."""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.unit.test_hostile_inputs import encoded, wav_declaring

from mmfusion.config import AudioPreprocessConfig, ImagePreprocessConfig, TextPreprocessConfig
from mmfusion.data.audio import audio_batch, decode_audio
from mmfusion.data.image import decode_image, image_batch
from mmfusion.data.parsers import parse_csv, parse_jsonl
from mmfusion.data.schema import SourceFile
from mmfusion.data.text import load_tokenizer, text_batch
from mmfusion.errors import DataError, DecodeError

FUZZ = settings(max_examples=150, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))


def _wav() -> bytes:
    buf = io.BytesIO()
    sf.write(buf, (0.2 * np.sin(np.arange(1600) / 5)).astype(np.float32), 8000, format="WAV")
    return buf.getvalue()


def _flac() -> bytes:
    buf = io.BytesIO()
    sf.write(buf, (0.2 * np.sin(np.arange(1600) / 5)).astype(np.float32), 16000, format="FLAC")
    return buf.getvalue()


SEEDS = [encoded("PNG"), encoded("JPEG"), encoded("GIF"), encoded("WEBP"), encoded("BMP"),
         encoded("PNG", mode="RGBA"), _wav(), _flac(), wav_declaring(10_001), wav_declaring(2**31 - 1)]


def _mutate(data: bytes, flips: list[tuple[int, int]], cut: int, insert: bytes) -> bytes:
    b = bytearray(data[:cut] if 0 < cut < len(data) else data)
    for pos, val in flips:
        b[pos % len(b)] = val
    at = cut % (len(b) + 1)
    return bytes(b[:at] + insert + b[at:])


BLOBS = st.one_of(
    st.binary(max_size=2048),
    st.builds(_mutate, st.sampled_from(SEEDS),
              st.lists(st.tuples(st.integers(0, 1 << 14), st.integers(0, 255)), max_size=12),
              st.integers(0, 1 << 14), st.binary(max_size=64)))


@FUZZ
@given(data=BLOBS)
def test_image_decoding_returns_pixels_or_a_decode_error(data):
    try:
        img = decode_image(data, 3)
    except DecodeError as e:
        assert e.modality == "image" and e.reason
    else:
        assert img.ndim == 3 and img.shape[0] == 3


@FUZZ
@given(data=BLOBS)
def test_audio_decoding_returns_samples_or_a_decode_error(data):
    try:
        wav, sr = decode_audio(data, max_seconds=1.0)
    except DecodeError as e:
        assert e.modality == "audio" and e.reason
    else:
        assert wav.ndim == 1 and wav.size > 0 and 1_000 <= sr <= 192_000


@FUZZ
@given(values=st.lists(st.one_of(st.none(), BLOBS), min_size=1, max_size=4))
def test_the_batch_preprocessors_give_a_reason_per_row(values):
    for batch, cfg in ((image_batch, ImagePreprocessConfig(size=16, channels=3)),
                       (audio_batch, AudioPreprocessConfig(sample_rate=8000, max_seconds=0.5))):
        out, errors = batch(values, cfg)
        assert len(out) == len(errors) == len(values)
        for v, e in zip(values, errors, strict=True):
            assert e is None or (isinstance(e, str) and e and v is not None)


_TOKENIZER = load_tokenizer(TextPreprocessConfig())


@FUZZ
@given(values=st.lists(st.one_of(st.none(), st.text(max_size=80), st.binary(max_size=80)), min_size=1,
                       max_size=4))
def test_the_text_preprocessor_gives_a_reason_per_row(values):
    ids, mask, truncated, errors = text_batch(values, TextPreprocessConfig(max_length=16), _TOKENIZER)
    assert ids.shape == mask.shape == (len(values), 16) and len(errors) == len(values)


_SRC = {fmt: SourceFile(location=f"/fuzz/data.{fmt}", name=f"data.{fmt}", format=fmt, split=None)
        for fmt in ("jsonl", "csv")}
_LINES = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda k, v: f'{{"{k}": {v}}}'.encode("utf-8", "surrogatepass"),
              st.sampled_from(["image", "text", "audio", "label", "id", "split", "\\ud800"]),
              st.sampled_from(['"x"', "1", "null", "[1]", '{"a": 1}', '"\\udfff"', "1e999"])))


@FUZZ
@given(lines=st.lists(_LINES, max_size=6), fmt=st.sampled_from(["jsonl", "csv"]))
def test_the_record_readers_give_a_reason_per_record(lines, fmt):
    data = b"\n".join(lines)
    parse = parse_jsonl if fmt == "jsonl" else parse_csv
    try:
        table = parse(data, _SRC[fmt], "label", {"image", "text", "audio"})
    except DataError as e:  # a whole file that cannot be read (a CSV header that is not UTF-8)
        assert str(e)
    else:
        for err in table.column("error").to_pylist():
            assert err is not None  # "" = readable, else "<field>: <reason>"


def test_a_jsonl_record_with_a_5000_digit_integer_is_a_rejected_record():
    # found by the fuzz above: a plain ValueError (not JSONDecodeError) used to stop the whole read
    deep = b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"  # RecursionError in json.loads
    table = parse_jsonl(b'{"text": "one", "label": "1"}\n{"text": 9' + b"9" * 5000 + b'}\n' + deep + b"\n",
                        _SRC["jsonl"], "label", {"image", "text", "audio"})
    errors = table.column("error").to_pylist()
    assert errors[0] == ""
    assert "line 2 is not valid JSON" in errors[1] and "digits" in errors[1]
    assert "line 3 is not valid JSON" in errors[2]
