"""`mmfusion init` on both built-in datasets writes a config that validates and trains as written (one
epoch instead of the chosen number, to keep the test short)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from mmfusion.config import load_config
from mmfusion.starter_config import write_starter_config

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("dataset", ["avt-digits", "ktuberling"])
def test_init_config_trains(ray_local, avt_tiny: Path, tmp_path: Path, dataset: str) -> None:
    from mmfusion.datasets.ktuberling import build_ktuberling
    from mmfusion.train.trainer import run_training

    root = avt_tiny if dataset == "avt-digits" else build_ktuberling(tmp_path / "kt", seed=0, variant="tiny")
    written = write_starter_config(str(root), tmp_path / "exp.yaml")
    cfg = load_config(written, [f"train.storage_path={tmp_path / 'runs'}", "train.epochs=1"])
    if dataset == "ktuberling":  # RGBA sprites with transparent backgrounds, 8-48 kHz clips
        assert cfg.data.image.channels == 3 and cfg.data.image.background == [255, 255, 255]
        assert cfg.data.audio.sample_rate == 16000
    else:  # 28 px grayscale MNIST digits
        assert cfg.data.image.size == 28 and cfg.data.image.channels == 1
    run = run_training(cfg)
    [epoch] = run.metrics["history"]
    assert math.isfinite(epoch["train_loss"]) and math.isfinite(epoch["val_loss"])
    assert (run.artifact / "model.safetensors").is_file()
