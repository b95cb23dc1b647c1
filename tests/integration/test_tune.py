"""Ray Tune on a real local cluster: a 3-trial ASHA search, one TorchTrainer per trial."""

from __future__ import annotations

import csv

import pytest
from tests.helpers import tiny_raw

from mmfusion.artifact import load_artifact
from mmfusion.config import validate_config
from mmfusion.evaluate.report import evaluate_artifact

pytestmark = pytest.mark.integration

# a good learning rate first, then two that cannot learn: ASHA must stop those at the first rung
SPACE = {"optim.lr": {"grid": [3e-3, 1e-7, 1e-7]}}


def tune_raw(data, storage, **tune):
    raw = tiny_raw(data, storage, "train.epochs=3", "train.num_workers=1")
    # val_loss separates the trials from the first epoch on (accuracy can tie on tiny data)
    raw["tune"] = {"space": SPACE, "scheduler": "asha", "num_samples": 1, "max_concurrent_trials": 1,
                   "metric": "val_loss", "mode": "min", **tune}
    return raw


def test_asha_search_stops_bad_trials_and_exports_the_best(ray_local, avt_tiny, tmp_path):
    from mmfusion.tune.runner import run_tune

    raw = tune_raw(avt_tiny, tmp_path / "runs", name="t3")
    run = run_tune(validate_config(raw))
    with run.csv.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    assert sum(r["status"] == "stopped early" for r in rows) >= 1
    assert {r["optim.lr"] for r in rows} == {"0.003", "1e-07"}
    best = min(rows, key=lambda r: float(r["best_val_loss"]))
    assert best["optim.lr"] == "0.003"
    assert run.plot.is_file() and "best val_loss" in run.table
    art = load_artifact(run.artifact)
    assert art.cfg.optim.lr == pytest.approx(3e-3) and art.cfg.tune is None
    assert art.cfg.data.audio.stats is not None  # measured once on train, exported with the best trial
    ev = evaluate_artifact(run.artifact, data=str(avt_tiny), split="test")
    assert 0.0 <= ev.report["accuracy"] <= 1.0 and ev.report["num_samples"] > 0
