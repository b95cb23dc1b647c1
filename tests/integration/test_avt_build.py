"""The default (small) AVT-Digits build, once: all 5,000 MNIST images used once, disjoint splits, ~5% missing
modalities per split, a data card that matches the files, and a dataset the platform's own reader accepts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from mmfusion.data import readers
from mmfusion.datasets.avt_digits import build_avt_digits

pytestmark = pytest.mark.integration

SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def avt_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_avt_digits(tmp_path_factory.mktemp("avt") / "avt_small", variant="small", seed=0)


def test_small_build_uses_every_mnist_image_once(avt_small: Path):
    expected = {"train": 3500, "val": 500, "test": 1000}
    used = []
    for split in SPLITS:
        t = pq.read_table(avt_small / f"{split}.parquet")
        prov = pq.read_table(avt_small / "_provenance" / f"{split}.parquet").to_pydict()
        assert t.num_rows == expected[split]
        used += prov["mnist_index"]
        counts = np.bincount(np.array(t["label"]), minlength=10)
        assert counts.min() > 0.07 * t.num_rows  # every class well represented (stratified split)
        missing = sum(t[m].null_count for m in ("image", "text", "audio"))
        assert missing == round(0.05 * t.num_rows)
    assert sorted(used) == list(range(5000))


def test_small_build_card_matches_and_the_platform_reader_accepts_it(avt_small: Path):
    card = json.loads((avt_small / "data_card.json").read_text())
    assert card["variant"] == "small"
    assert {s: card["splits"][s]["rows"] for s in SPLITS} == {"train": 3500, "val": 500, "test": 1000}
    assert len(card["generation"]["espeak_voice_settings"]["train"]) >= 80  # many voices, rates and pitches
    assert card["splits"]["test"]["audio_voices"].keys() == {f"asterisk:{v}" for v in
                                                            card["generation"]["asterisk_voices"]}
    files = readers.discover(str(avt_small))
    # _provenance is skipped
    assert sorted((f.split, Path(f.location).name) for f in files) == [
        ("test", "test.parquet"), ("train", "train.parquet"), ("val", "val.parquet")]
    summary = readers.summarize(str(avt_small), "label")
    assert summary.rows == {"train": 3500, "val": 500, "test": 1000}
    assert {"id", "split", "image", "text", "audio", "label"} <= summary.columns
