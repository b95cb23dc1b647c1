"""Serving compute without Ray: the runners behind the deployments give the offline `evaluate` numbers, and a
bad input fails only its own row, with the reason the HTTP layer reports."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch
from PIL import Image
from tests.helpers import tiny_config

from mmfusion.artifact import load_artifact, read_artifact_info, save_artifact
from mmfusion.config import AudioStats
from mmfusion.data.audio import audio_batch
from mmfusion.data.preprocessor import input_spec
from mmfusion.data.readers import read_records
from mmfusion.evaluate.report import predict_split
from mmfusion.models.model import build_model
from mmfusion.serving.engine import EncoderRunner, FusionRunner, ModelRunner, keep_encoder, keep_fusion

CPU = torch.device("cpu")
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SCHEMA = pa.schema([("id", pa.string()), ("image", pa.binary()), ("text", pa.string()),
                    ("audio", pa.binary()), ("label", pa.string())])


def png_bytes(rng: np.random.Generator, k: int, size: int = 28) -> bytes:
    a = (rng.random((size, size)) * 60).astype(np.uint8)
    a[4 + k: 10 + k, 6:22] = 255  # a bar whose height encodes the class
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def wav_bytes(samples: np.ndarray, sr: int = 8000, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, sr, format="WAV", subtype=subtype)
    return buf.getvalue()


def tone(rng: np.random.Generator, k: int, seconds: float = 0.6, sr: int = 8000) -> bytes:
    t = np.arange(int(seconds * sr)) / sr
    return wav_bytes((0.3 * np.sin(2 * np.pi * (200 + 60 * k) * t) + 0.01 * rng.standard_normal(t.size))
                     .astype(np.float32), sr)


def write_records(root: Path, n: int = 30, seed: int = 0) -> Path:
    """train/test Parquet with real PNG/WAV bytes and number words; some rows miss a modality."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        rows: dict[str, list] = {k: [] for k in SCHEMA.names}
        for i in range(n):
            k = i % 10
            rows["id"].append(f"{split}-{i}")
            rows["label"].append(str(k))
            rows["image"].append(png_bytes(rng, k) if i % 7 != 3 else None)
            rows["text"].append(WORDS[k] if i % 5 != 2 else None)
            rows["audio"].append(tone(rng, k, sr=16000 if i % 4 == 0 else 8000) if i % 6 != 1 else None)
        pq.write_table(pa.table(rows, schema=SCHEMA), root / f"{split}.parquet")
    return root


def make_artifact(data: Path, out: Path, *overrides: str) -> Path:
    """A randomly initialised tiny model saved as an artifact (no training: the numbers are what matter).
    With audio, the config carries audio statistics as training writes them, so that the offline and the
    served paths both have to apply them."""
    cfg = tiny_config(data, out.parent / "runs", *overrides)
    if "audio" in cfg.data.modalities:
        f = input_spec(cfg.data).audio_shape[1]
        cfg.data.audio.stats = AudioStats(mean=list(np.linspace(-10.0, -2.0, f)),
                                          std=list(np.linspace(1.5, 4.0, f)))
    torch.manual_seed(0)
    model = build_model(cfg.model, input_spec(cfg.data), 10)
    last = [m for m in model.head.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():  # sharper logits: random-init rows would differ by less than the tolerance tested
        last.weight.mul_(30.0)
    return save_artifact(out, model.state_dict(), cfg, [str(i) for i in range(10)], {})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving_engine")
    data = write_records(root / "data")
    art = make_artifact(data, root / "artifact")
    rows = read_records(str(data), "test").to_pylist()
    return data, art, rows


def split_predict(art_dir: Path, items: list[dict]) -> list:
    """What the split topology computes: one runner per modality (each its own model copy), then fusion."""
    data_cfg = load_artifact(art_dir).cfg.data
    feats: list[dict] = [{} for _ in items]
    for m in data_cfg.modalities:
        runner = EncoderRunner(keep_encoder(load_artifact(art_dir).model, m), data_cfg, m, CPU)
        rows = [i for i, it in enumerate(items) if m in it]
        for i, enc in zip(rows, runner([items[i][m] for i in rows]), strict=True):
            assert enc.error is None, enc
            feats[i][m] = enc.embedding
    fusion = FusionRunner(keep_fusion(load_artifact(art_dir).model), CPU)
    return fusion(feats)


@pytest.mark.parametrize("keep", [None, ["image"], ["text"], ["audio"]])
def test_runners_match_offline_evaluate(setup, keep):
    data, art_dir, rows = setup
    art = load_artifact(art_dir)
    offline = predict_split(art, str(data), "test", modalities=keep)  # the `mmfusion evaluate` path
    mods = keep or ["image", "text", "audio"]
    by_id = {r["id"]: {m: r[m] for m in mods if r[m] is not None} for r in rows}
    # predict_split drops the rows left with no modality after hiding, but lists every decodable row's id
    items = [it for it in (by_id[i] for i in offline.ids) if it]
    assert len(items) == len(offline.probs) >= 10
    single = np.stack([p.probabilities
                       for p in ModelRunner(load_artifact(art_dir).model, art.cfg.data, CPU)(items)])
    split = np.stack(split_predict(art_dir, items))
    np.testing.assert_allclose(single, offline.probs, atol=1e-5, rtol=0)
    np.testing.assert_allclose(split, offline.probs, atol=1e-5, rtol=0)
    assert np.abs(offline.probs - offline.probs.mean(0)).max() > 1e-3  # rows differ far beyond the tolerance


def test_batch_equals_one_by_one(setup):
    _, art_dir, rows = setup
    art = load_artifact(art_dir)
    items = [{m: r[m] for m in ("image", "text", "audio") if r[m] is not None} for r in rows[:12]]
    runner = ModelRunner(art.model, art.cfg.data, CPU)
    batched = np.stack([p.probabilities for p in runner(items)])
    alone = np.stack([runner([it])[0].probabilities for it in items])
    np.testing.assert_allclose(batched, alone, atol=1e-5, rtol=0)


def test_a_bad_row_fails_alone(setup):
    _, art_dir, rows = setup
    art = load_artifact(art_dir)
    rng = np.random.default_rng(1)
    good = png_bytes(rng, 3)
    runner = EncoderRunner(keep_encoder(art.model, "image"), art.cfg.data, "image", CPU)
    out = runner([good, b"\x89PNG\r\n\x1a\ncorrupt", b"", good[: len(good) // 2]])
    assert out[0].error is None and out[0].embedding.shape == (32,)
    assert out[1].error.startswith("not a recognised image format") and out[1].embedding is None
    assert out[2].error == "empty (0 bytes)"
    assert "undecodable" in out[3].error  # a truncated PNG
    np.testing.assert_allclose(out[0].embedding, runner([good])[0].embedding, atol=1e-6)


def test_audio_statistics_travel_in_the_artifact(setup):
    _, art, rows = setup
    stats = read_artifact_info(art).cfg.data.audio.stats
    assert stats is not None and stats.mean[0] == -10.0 and stats.std[-1] == 4.0
    clip = next(r["audio"] for r in rows if r["audio"] is not None)
    cfg = load_artifact(art).cfg.data
    runner = EncoderRunner(keep_encoder(load_artifact(art).model, "audio"), cfg, "audio", CPU)
    runner_in, _ = runner.preprocess([clip])  # what the audio encoder replica feeds its model
    raw, _ = audio_batch([clip], cfg.audio.model_copy(update={"stats": None}))
    mean = np.asarray(stats.mean, np.float32)[None, None, :, None]
    std = np.asarray(stats.std, np.float32)[None, None, :, None]
    np.testing.assert_allclose(runner_in["audio"], (raw - mean) / std, rtol=1e-6, atol=1e-6)


def test_audio_inputs(setup):
    _, art_dir, _ = setup
    art = load_artifact(art_dir)
    rng = np.random.default_rng(2)
    runner = EncoderRunner(keep_encoder(art.model, "audio"), art.cfg.data, "audio", CPU)
    silent = wav_bytes(np.zeros(4000, np.float32))
    nan = wav_bytes(np.full(4000, np.nan, np.float32), subtype="FLOAT")
    header_only = wav_bytes(np.zeros(0, np.float32))
    long_clip = tone(rng, 5, seconds=2.5)
    out = runner([tone(rng, 1), silent, nan, header_only, b"just some text, not audio", long_clip])
    assert out[0].error is None and out[0].warning is None
    assert (out[1].status, out[1].error) == (422, "silent clip (every sample is zero): nothing to classify")
    assert out[2].status == 400 and "non-finite" in out[2].error
    assert "zero-length" in out[3].error
    assert "undecodable" in out[4].error
    assert out[5].error is None and "cut to its first 1 s" in out[5].warning
    assert all(np.isfinite(o.embedding).all() for o in out if o.error is None)


def test_text_truncation_is_a_warning(setup):
    _, art_dir, _ = setup
    art = load_artifact(art_dir)
    runner = EncoderRunner(keep_encoder(art.model, "text"), art.cfg.data, "text", CPU)
    out = runner(["seven", "seven " * 100])
    assert out[0].warning is None and out[0].error is None
    assert out[1].error is None
    assert out[1].warning == "text: truncated to 32 tokens (data.text.max_length of the model)"


def test_parts_are_pruned_and_checked(setup):
    _, art_dir, _ = setup
    full = sum(p.numel() for p in load_artifact(art_dir).model.parameters())
    enc = keep_encoder(load_artifact(art_dir).model, "text")
    assert list(enc.encoders) == ["text"] and enc.fusion is None
    assert sum(p.numel() for p in enc.parameters()) < full / 2
    fusion = FusionRunner(keep_fusion(load_artifact(art_dir).model), CPU)
    assert len(fusion.model.encoders) == 0
    assert fusion([{"video": np.zeros(32, np.float32)}]) == [None]  # unknown modality: that row fails
    fusion.probe()


def test_an_encoder_exception_fails_only_its_row(setup, monkeypatch):
    """Not a decode error but the encoder itself failing (a bug, an OOM on one input): the batch is retried
    row by row: the failing row gets a 503 (the ingress adds Retry-After), the others their embeddings."""
    _, art_dir, _ = setup
    art = load_artifact(art_dir)
    runner = EncoderRunner(keep_encoder(art.model, "text"), art.cfg.data, "text", CPU)
    alone = [runner([t])[0].embedding for t in ("one", "two")]
    real = runner.preprocess

    def poisoned(values):
        if "POISON" in values:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(values)

    monkeypatch.setattr(runner, "preprocess", poisoned)
    out = runner(["one", "POISON", "two"])
    assert (out[1].status, out[1].embedding) == (503, None) and "text encoder failed" in out[1].error
    for o, a in zip([out[0], out[2]], alone, strict=True):
        assert o.error is None
        np.testing.assert_allclose(o.embedding, a, atol=1e-6)


def test_a_fusion_exception_fails_only_its_row(setup, monkeypatch):
    _, art_dir, _ = setup
    fusion = FusionRunner(keep_fusion(load_artifact(art_dir).model), CPU)
    real = fusion.model.fuse

    def fuse(feats, present):
        if any(bool(torch.isnan(v).any()) for v in feats.values()):
            raise RuntimeError("NaN in the fusion input")
        return real(feats, present)

    monkeypatch.setattr(fusion.model, "fuse", fuse)
    good = {"text": np.ones(32, np.float32)}
    out = fusion([good, {"text": np.full(32, np.nan, np.float32)}, good])
    assert out[1] is None and out[0] is not None and out[2] is not None
    np.testing.assert_allclose(out[0], fusion([good])[0], atol=1e-6)
