"""Ray Train on a real local cluster: 2-worker DDP, artifact round trip, worker-failure recovery."""

from __future__ import annotations

import dataclasses
import os
import pickle
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.helpers import ckpts as _ckpts
from tests.helpers import tiny_config

from mmfusion.artifact import load_artifact
from mmfusion.errors import ConfigError, DataError

pytestmark = pytest.mark.integration


def _predict(artifact, table_dir: Path):
    from mmfusion.evaluate.report import predict_split

    return predict_split(artifact, str(table_dir), "test")


def _trained_model(run_dir: Path, epoch: int, cfg) -> torch.nn.Module:
    """The model as training left it: the weights of the checkpoint of `epoch`, read from the run folder
    (not from the artifact), in a freshly built model."""
    import json

    from mmfusion.data.preprocessor import input_spec
    from mmfusion.models.model import build_model
    from mmfusion.train.checkpoint import load_model_state

    [ckpt] = [d for d in _ckpts(run_dir) if json.loads((d / "state.json").read_text())["epoch"] == epoch]
    model = build_model(cfg.model, input_spec(cfg.data), num_classes=10, load_weights=False)
    model.load_state_dict(load_model_state(ckpt), strict=True)
    return model.eval()


def test_two_worker_training_writes_an_artifact_that_predicts_like_the_trained_model(ray_local, avt_tiny,
                                                                                    tmp_path, monkeypatch):
    from mmfusion.train.trainer import run_training

    cfg = tiny_config(avt_tiny, tmp_path / "runs", "train.num_workers=2")
    before = _run_actors()
    handler = signal.getsignal(signal.SIGINT)
    run = run_training(cfg)
    # fit()'s SIGINT handler is gone with the run: it held the finished run's controller and its actors
    assert signal.getsignal(signal.SIGINT) is handler
    deadline = time.monotonic() + 20
    while (left := _run_actors() - before) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"the finished run's actors are still alive: {sorted(left)}"
    art_dir = run.artifact
    for f in ("model.safetensors", "config.yaml", "labels.json", "metrics.json", "training_curves.png"):
        assert (art_dir / f).is_file(), f
    assert run.metrics["epochs_run"] == 2
    assert [h["world_size"] for h in run.metrics["history"]] == [2, 2]

    def no_pickle(*a, **k):
        raise AssertionError("artifact loading must not unpickle")

    with monkeypatch.context() as m:  # loading never unpickles: safetensors + YAML/JSON only
        m.setattr(pickle, "load", no_pickle)
        m.setattr(pickle, "loads", no_pickle)
        m.setattr(torch, "load", no_pickle)
        art = load_artifact(art_dir)
    assert art.cfg.data.audio.stats is not None  # measured on train, kept for evaluation and serving
    # the artifact must predict what the kept (best) checkpoint's model predicts, on the same test rows
    trained = _trained_model(Path(run.path), run.metrics["best_epoch"], cfg)
    got = _predict(art, avt_tiny)
    expected = _predict(dataclasses.replace(art, model=trained), avt_tiny)
    assert got.probs.shape[1] == 10 and len(got.probs) > 0
    assert got.ids == expected.ids
    np.testing.assert_allclose(got.probs, expected.probs, rtol=0, atol=1e-6)


def _run_actors() -> set[str]:
    """Actor ids of the Train controllers, dataset managers and split coordinators alive on this cluster."""
    import ray
    from ray.util.state import list_actors

    classes = ("TrainController", "DatasetManager", "SplitCoordinator")
    return {a.actor_id for a in list_actors(address=ray.get_runtime_context().gcs_address,
                                            filters=[("state", "=", "ALIVE")], limit=10000)
            if a.class_name in classes}


def _worker_pids() -> list[int]:
    import ray
    from ray.util.state import list_actors

    # name the cluster explicitly: other local clusters (another test's, a user's) may be running
    actors = list_actors(address=ray.get_runtime_context().gcs_address,
                         filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    return [a.pid for a in actors if a.pid]


def test_killed_worker_restarts_from_the_last_checkpoint(ray_local, avt_tiny, tmp_path):
    from mmfusion.train.trainer import run_training

    cfg = tiny_config(avt_tiny, tmp_path / "runs", "train.num_workers=2", "train.epochs=6",
                      "train.max_failures=1", "train.run_name=killme")
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(run=run_training(cfg)), daemon=True)
    t.start()
    run_dir = tmp_path / "runs" / "killme"
    deadline = time.time() + 300
    # written once the controller registered a checkpoint
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    while time.time() < deadline and not snapshot.exists():
        time.sleep(0.2)
    assert snapshot.exists(), "no checkpoint was registered"
    pids = _worker_pids()
    assert pids
    os.kill(pids[0], signal.SIGKILL)
    t.join(timeout=600)
    metrics = result["run"].metrics
    assert metrics["epochs_run"] == 6
    assert len(metrics["starts"]) == 2 and metrics["starts"][0] == 0
    resumed = metrics["starts"][1]
    assert 1 <= resumed < 6  # continued from a checkpoint, did not start over
    assert [h["epoch"] for h in metrics["history"]] == list(range(6))


def test_more_workers_than_the_cluster_fits_fails_fast(ray_local, avt_tiny, tmp_path):
    from mmfusion.train.trainer import run_training

    with pytest.raises(ConfigError, match="num_workers"):
        run_training(tiny_config(avt_tiny, tmp_path / "runs", "train.num_workers=64"))


def test_modality_the_data_lacks_fails_with_a_clear_error(ray_local, avt_tiny, tmp_path):
    import pyarrow.parquet as pq

    from mmfusion.train.trainer import run_training

    data = tmp_path / "noaudio"
    data.mkdir()
    for split in ("train", "val", "test"):
        t = pq.read_table(avt_tiny / f"{split}.parquet")
        pq.write_table(t.drop_columns(["audio"]), data / f"{split}.parquet")
    with pytest.raises(DataError, match="audio"):
        run_training(tiny_config(data, tmp_path / "runs"))


def test_single_modality_data_skips_rows_without_it_instead_of_rejecting(ray_local, avt_tiny, tmp_path):
    import pyarrow.parquet as pq

    from mmfusion.data.pipeline import build_datasets

    cfg = tiny_config(avt_tiny, tmp_path / "runs", "data.modalities=[image]", "data.max_bad_fraction=0.0")
    bundle = build_datasets(cfg.data, splits=("train", "val"), seed=cfg.seed)  # no DataError at 0% tolerance
    train = pq.read_table(avt_tiny / "train.parquet")
    with_image = sum(v is not None for v in train.column("image").to_pylist())
    assert with_image < train.num_rows  # the tiny build has rows without an image
    assert bundle.train_rows == with_image and bundle.num_rejected == 0
