"""KTuberling's rough edges through the Ray Data pipeline: RGBA sprites of many sizes, OGG Vorbis/Opus
and WAV clips at 8-48 kHz in mono and stereo, Cyrillic and Latin texts, missing fields, string labels ->
torch batches."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from mmfusion.config import DataConfig
from mmfusion.data.pipeline import build_datasets, iter_torch_batches
from mmfusion.datasets.ktuberling import LABELS, build_ktuberling

pytestmark = pytest.mark.integration


def test_tiny_ktuberling_flows_through_the_pipeline(ray_local, tmp_path: Path) -> None:
    root = build_ktuberling(tmp_path / "kt", seed=0, variant="tiny")
    cfg = DataConfig.model_validate({
        "path": str(root),
        "image": {"size": 32, "channels": 3, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
        "text": {"max_length": 32},
        "audio": {"sample_rate": 16000, "n_fft": 512, "hop_length": 160, "max_seconds": 2.0},
    })
    bundle = build_datasets(cfg, seed=0)
    assert bundle.num_rejected == 0
    assert sorted(bundle.labels) == sorted(set(LABELS.values()))
    labels: Counter[int] = Counter()
    missing = 0
    for b in iter_torch_batches(bundle.train, batch_size=16, spec=bundle.spec):
        assert tuple(b["image"].shape[1:]) == (3, 32, 32)
        assert b["audio"].shape[0] == b["label"].shape[0]
        missing += int((~b["present"].bool()).sum())
        labels.update(b["label"].tolist())
    assert sum(labels.values()) == bundle.train_rows and len(labels) == len(set(LABELS.values()))
    assert missing > 0  # the removed images/clips arrive as absent modalities, not as errors
