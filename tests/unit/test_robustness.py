"""`mmfusion evaluate --robustness` without Ray: the noise kernels do what their levels say, and on a tiny
trained model (fixed seed) all modalities beat any single one and accuracy falls as the noise grows."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import soundfile as sf
from PIL import Image
from tests.unit.test_serving_engine import png_bytes, tone

from mmfusion.errors import DataError
from mmfusion.evaluate.noise import NOISES, corrupt
from mmfusion.evaluate.robustness import plan_conditions


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)), dtype=np.float32) / 255


def test_image_noise_and_blur_grow_with_their_level():
    rng = np.random.default_rng(0)
    images = [png_bytes(rng, k) for k in range(4)]
    ids = [f"r{k}" for k in range(4)]
    clean = np.stack([_pixels(b) for b in images])
    assert corrupt(images, ids, "image_noise", 0.0) == images  # the clean level leaves the bytes alone
    errors, sharpness = [], []
    for level in NOISES["image_noise"].levels[1:]:
        noisy = np.stack([_pixels(b) for b in corrupt(images, ids, "image_noise", level)])
        errors.append(float(np.abs(noisy - clean).mean()))
    for level in NOISES["image_blur"].levels[1:]:
        blurred = np.stack([_pixels(b) for b in corrupt(images, ids, "image_blur", level)])
        sharpness.append(float(np.abs(np.diff(blurred, axis=1)).mean()))
    assert errors == sorted(errors) and errors[0] > 0.02
    assert sharpness == sorted(sharpness, reverse=True) and sharpness[-1] < 0.5 * sharpness[0]
    # each row's noise depends on its id, not on its batch: the same bytes one by one or together
    assert corrupt(images, ids, "image_noise", 0.2) == [corrupt([b], [i], "image_noise", 0.2)[0]
                                                         for b, i in zip(images, ids, strict=True)]
    assert corrupt([None, b"junk"], ["a", "b"], "image_noise", 0.2) == [None, b"junk"]  # left for the kernel


def test_audio_noise_has_the_asked_snr():
    clip = tone(np.random.default_rng(0), 3, seconds=1.0)
    signal, sr = sf.read(io.BytesIO(clip), dtype="float32")
    for snr in (20.0, 5.0, -5.0):
        noisy, sr2 = sf.read(io.BytesIO(corrupt([clip], ["a"], "audio_snr", snr)[0]), dtype="float32")
        measured = 10 * math.log10(np.mean(signal**2) / np.mean((noisy - signal) ** 2))
        assert sr2 == sr and measured == pytest.approx(snr, abs=0.5)
    assert corrupt([clip], ["a"], "audio_snr", math.inf) == [clip]


def test_typos_follow_the_rate():
    texts = ["seventeen thousand four hundred"] * 40
    ids = [str(i) for i in range(40)]
    assert corrupt(texts, ids, "text_typos", 0.0) == texts
    changed = [sum(a != b for a, b in zip(t, texts[0], strict=False)) for t in
               corrupt(texts, ids, "text_typos", 0.3)]
    assert np.mean(changed) > 5  # about 30% of 31 characters touched, the rest shifted by deletions
    assert all(corrupt(["a"] * 50, ids + ids[:10], "text_typos", 1.0))  # never empty (not a missing text)


def test_conditions_cover_every_subset_and_level():
    conds = plan_conditions(["image", "text", "audio"])
    subsets = [c.keep for c in conds if c.noise is None]
    assert len(subsets) == 7 and subsets[0] == ("image", "text", "audio") and ("audio",) in subsets
    noisy = [c for c in conds if c.noise]
    assert len(noisy) == sum(len(nk.levels) - 1 for nk in NOISES.values())
    assert {c.noise for c in plan_conditions(["text"])} == {None, "text_typos"}
    with pytest.raises(DataError, match="unknown noise"):
        plan_conditions(["text"], noises=["text_blur"])


@pytest.fixture(scope="module")
def robustness(avt_tiny, tmp_path_factory):
    from tests.eval_helpers import train_tiny_artifact

    from mmfusion.evaluate.robustness import evaluate_robustness

    art = train_tiny_artifact(avt_tiny, tmp_path_factory.mktemp("robust") / "art", steps=100, seed=0)
    # the train split: the tiny model fits it, so what hiding or corrupting a modality costs stands out
    return art, evaluate_robustness(art, data=str(avt_tiny), split="train", local=True, seed=0)


def test_all_modalities_beat_any_single_one(robustness):
    art, rob = robustness
    acc = {"+".join(s["modalities"]): s["accuracy"] for s in rob.results["subsets"]}
    assert len(acc) == 7 and rob.results["rows"] > 150
    assert acc["image+text+audio"] >= max(acc["image"], acc["text"], acc["audio"])
    assert acc["image+text+audio"] > 0.5  # the model learned something: chance is 0.1


def test_accuracy_falls_as_noise_grows(robustness):
    _, rob = robustness
    curves = {k: [p["accuracy"] for p in c["points"]] for k, c in rob.results["noise"].items()}
    assert set(curves) == set(NOISES)
    for kind, acc in curves.items():
        assert acc[-1] < acc[0], (kind, acc)  # the strongest noise costs accuracy on every modality
    image = curves["image_noise"]  # the modality the tiny model leans on: a steady fall, and a steep one
    assert all(b <= a for a, b in zip(image, image[1:], strict=False)), image
    assert image[-1] < image[0] - 0.2


def test_robustness_files_next_to_the_artifact(robustness):
    art, rob = robustness
    assert rob.json_path == art / "robustness.json" and rob.plot == art / "robustness.png"
    assert json.loads(rob.json_path.read_text())["subsets"] == rob.results["subsets"]
    assert rob.plot.stat().st_size > 10_000
    assert json.loads((art / "metrics.json").read_text())["robustness"]["rows"] == rob.results["rows"]
    assert "image+text+audio" in rob.table and "audio_snr" in rob.table
