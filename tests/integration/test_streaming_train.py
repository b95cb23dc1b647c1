"""data.cache=none trains end to end: the splits stream from the files every epoch (nothing materialized),
with a global shuffle of train per epoch, and the run writes an artifact that predicts. data.cache=memory is
what test_train.py's runs use (auto picks it for the tiny data). The run is conftest.py's
tracked_streamed_train, a `mmfusion train` that test_tracking_runs.py reads too."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.integration


def test_streamed_data_with_global_shuffle_trains(tracked_streamed_train):
    from mmfusion.artifact import load_artifact

    proc = tracked_streamed_train.proc
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mmfusion.data.pipeline: data.cache=none" in proc.stderr  # the driver's INFO line
    artifact = tracked_streamed_train.run_dir / "artifact"
    metrics = json.loads((artifact / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2
    history = metrics["history"]
    assert all(h["samples_per_s"] > 0 for h in history)
    # every epoch saw the whole train split (streamed again, not cached): the loss moved
    assert history[-1]["train_loss"] != history[0]["train_loss"]
    assert metrics["train_rows"] > 0 and metrics["val_rows"] > 0
    art = load_artifact(artifact)
    assert art.cfg.data.cache == "none" and art.cfg.data.audio.stats is not None
    assert metrics["evaluation"]["val"]["num_samples"] == metrics["val_rows"]  # the streamed val
