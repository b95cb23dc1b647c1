"""data.cache=none trains end to end: the splits stream from the files every epoch (nothing materialized),
with a global shuffle of train per epoch, and the run writes an artifact that predicts. data.cache=memory is
what test_train.py's runs use (auto picks it for the tiny data)."""

from __future__ import annotations

import logging

import pytest
from tests.helpers import tiny_config

pytestmark = pytest.mark.integration


def test_streamed_data_with_global_shuffle_trains(ray_local, avt_tiny, tmp_path, caplog):
    from mmfusion.artifact import load_artifact
    from mmfusion.train.trainer import run_training

    cfg = tiny_config(avt_tiny, tmp_path / "runs", "data.cache=none", "data.shuffle=global",
                      "train.epochs=2")
    with caplog.at_level(logging.INFO, logger="mmfusion.data.pipeline"):
        run = run_training(cfg)
    assert "data.cache=none" in caplog.text
    assert run.metrics["epochs_run"] == 2
    history = run.metrics["history"]
    assert all(h["samples_per_s"] > 0 for h in history)
    # every epoch saw the whole train split (streamed again, not cached): the loss moved
    assert history[-1]["train_loss"] != history[0]["train_loss"]
    assert run.metrics["train_rows"] > 0 and run.metrics["val_rows"] > 0
    art = load_artifact(run.artifact)
    assert art.cfg.data.cache == "none" and art.cfg.data.audio.stats is not None
    assert run.metrics["evaluation"]["val"]["num_samples"] == run.metrics["val_rows"]  # the streamed val
