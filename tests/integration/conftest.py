"""Runs that several integration tests read: each is paid for once per session.

A Tune search or a training run on the session cluster costs 20 s to a minute (most of it Ray Train start-up,
not epochs), so tests that assert different things about the same kind of run share one.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from tests.helpers import tiny_raw, write_tiny_yaml

# a good learning rate first, then two that cannot learn: ASHA must stop those at the first rung
ASHA_SPACE = {"optim.lr": {"grid": [3e-3, 1e-7, 1e-7]}}
TRACKING = "train.tracking=[tensorboard, mlflow]"
MMF = str(Path(sys.executable).parent / "mmfusion")


@dataclass
class SharedTune:
    run: Any  # mmfusion.tune.runner.TuneRun
    storage: Path  # train.storage_path: the experiment folder and the MLflow store (mlruns/) live under it


def asha_raw(data: Path, storage: Path, **tune: Any) -> dict[str, Any]:
    raw = tiny_raw(data, storage, "train.epochs=3", "train.num_workers=1", TRACKING)
    # val_loss separates the trials from the first epoch on (accuracy can tie on tiny data)
    raw["tune"] = {"space": ASHA_SPACE, "scheduler": "asha", "num_samples": 1, "max_concurrent_trials": 1,
                   "metric": "val_loss", "mode": "min", **tune}
    return raw


@pytest.fixture(scope="session")
def asha_tune(ray_local, avt_tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> SharedTune:
    """A 3-trial ASHA search (3 epochs, one trial at a time) with TensorBoard and MLflow tracking on.
    test_tune.py checks the search and its exported best trial; test_tracking_runs.py, each trial's
    tracking."""
    from mmfusion.config import validate_config
    from mmfusion.tune.runner import run_tune

    storage = tmp_path_factory.mktemp("asha") / "runs"
    run = run_tune(validate_config(asha_raw(avt_tiny, storage, name="t3")))
    return SharedTune(run=run, storage=storage)


@dataclass
class SharedTrain:
    proc: subprocess.CompletedProcess  # `mmfusion train`'s exit status, stdout and stderr
    storage: Path  # train.storage_path: the run folder and the MLflow store (mlruns/) live under it
    run_dir: Path  # Ray Train's run folder; the artifact is its artifact/


@pytest.fixture(scope="session")
def tracked_streamed_train(ray_local, avt_tiny: Path,
                           tmp_path_factory: pytest.TempPathFactory) -> SharedTrain:
    """`mmfusion train` as a user runs it, in its own process (a fresh driver joined to the session cluster,
    so Ray's once-per-process lines, such as core_worker's of ray#53727, would show): 2 epochs, TensorBoard
    and MLflow tracking on, a step scalar every 2 steps, on streamed data (data.cache=none: nothing
    materialized, the splits read again every epoch) with a global shuffle of train per epoch.
    test_tracking_runs.py reads its trackers and its log lines; test_streaming_train.py, its streamed data."""
    tmp = tmp_path_factory.mktemp("tracked")
    storage = tmp / "runs"
    cfg_file = write_tiny_yaml(tmp / "tiny.yaml", avt_tiny, storage, TRACKING, "train.run_name=tracked",
                               "train.log_every_n_steps=2", "data.cache=none", "data.shuffle=global")
    address = ray_local.get_runtime_context().gcs_address
    proc = subprocess.run([MMF, "train", str(cfg_file), "--address", address], capture_output=True, text=True,
                          timeout=600)
    return SharedTrain(proc, storage, storage / "tracked")
