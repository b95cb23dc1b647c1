"""Ray Tune on a real local cluster: a 3-trial ASHA search, one TorchTrainer per trial (the session's shared
search, tests/integration/conftest.py::asha_tune; test_tracking_runs.py reads its trials' tracking)."""

from __future__ import annotations

import csv

import pytest

from mmfusion.artifact import load_artifact
from mmfusion.evaluate.report import evaluate_artifact

pytestmark = pytest.mark.integration


def test_asha_search_stops_bad_trials_and_exports_the_best(asha_tune, avt_tiny):
    run = asha_tune.run
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
