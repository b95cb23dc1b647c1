"""Tracking without Ray: rank 0's Tracker and the driver's finish_run, read back with TensorBoard's
EventAccumulator and MLflow's client (the file store under the storage path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmfusion.config import validate_config
from mmfusion.train.tracking import Tracker, find_mlflow_run, finish_run, flatten, mlflow_uri

METRICS = [{"epoch": 0, "train_loss": 2.0, "val_accuracy": 0.25, "lr": 1e-3, "world_size": 1},
           {"epoch": 1, "train_loss": 1.5, "val_accuracy": 0.5, "lr": 5e-4, "world_size": 1}]


def _cfg(data: Path, storage: Path, *trackers: str):
    return validate_config({"data": {"path": str(data), "modalities": ["image", "text"]},
                            "model": {"fusion": {"name": "gated"}},
                            "train": {"storage_path": str(storage), "tracking": list(trackers)}})


def _events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "toy"
    d.mkdir()
    (d / "train.jsonl").write_text('{"text": "one", "label": "1"}\n')
    return d


def _train(cfg, run: Path) -> None:
    tracker = Tracker(cfg, str(run))
    for m in METRICS:
        tracker.log_epoch(m)
    tracker.close()
    art = run / "artifact"
    art.mkdir(parents=True)
    Image.fromarray(np.full((8, 12, 3), 200, np.uint8)).save(art / "training_curves.png")
    (art / "metrics.json").write_text("{}")
    finish_run(cfg, str(run), art, step=1)


def test_tensorboard_gets_every_scalar_the_config_as_hparams_and_the_pngs(tmp_path, data_dir):
    cfg = _cfg(data_dir, tmp_path / "runs", "tensorboard")
    run = tmp_path / "runs" / "r1"
    _train(cfg, run)
    acc = _events(run / "tensorboard")
    tags = acc.Tags()
    for key in ("train_loss", "val_accuracy", "lr", "world_size"):
        assert [e.step for e in acc.Scalars(key)] == [0, 1], key
    assert [e.value for e in acc.Scalars("val_accuracy")] == [0.25, 0.5]
    assert "training_curves" in tags["images"]
    assert acc.Images("training_curves")[0].height == 8
    plugins = acc.PluginTagToContent("hparams")  # experiment + session start/end summaries
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(plugins)
    assert not (tmp_path / "runs" / "mlruns").exists()  # mlflow is off by default


def test_mlflow_file_store_gets_params_metrics_tags_and_the_artifact_folder(tmp_path, data_dir):
    from mlflow.tracking import MlflowClient

    cfg = _cfg(data_dir, tmp_path / "runs", "mlflow")
    run = tmp_path / "runs" / "r1"
    _train(cfg, run)
    uri = mlflow_uri(cfg, str(tmp_path / "runs"))
    assert uri == f"file:{tmp_path / 'runs' / 'mlruns'}"
    client = MlflowClient(uri)
    run_id = find_mlflow_run(client, "toy", str(run))  # experiment named after the dataset
    got = client.get_run(run_id)
    assert got.info.status == "FINISHED"
    assert got.data.params["model.fusion.name"] == "gated"
    assert got.data.params["train.storage_path"] == str(tmp_path / "runs")
    assert [m.value for m in client.get_metric_history(run_id, "val_accuracy")] == [0.25, 0.5]
    assert got.data.tags["run_name"] == "r1" and got.data.tags["mlflow.runName"] == "r1"
    assert len(got.data.tags["dataset_fingerprint"]) == 16
    names = {a.path for a in client.list_artifacts(run_id, "artifact")}
    assert names == {"artifact/metrics.json", "artifact/training_curves.png"}
    assert not (run / "tensorboard").exists()


def test_a_resumed_run_continues_its_mlflow_run_and_drops_repeated_tensorboard_steps(tmp_path, data_dir):
    from mlflow.tracking import MlflowClient

    cfg = _cfg(data_dir, tmp_path / "runs", "tensorboard", "mlflow")
    run = tmp_path / "runs" / "r1"
    first = Tracker(cfg, str(run))
    first.log_epoch(METRICS[0])
    first.log_epoch(METRICS[1])  # the epoch that the crash lost: its checkpoint was never written
    first.close()
    again = Tracker(cfg, str(run), start_epoch=1)
    again.log_epoch({**METRICS[1], "val_accuracy": 0.75})
    again.close()
    assert first.run_id == again.run_id
    assert [e.value for e in _events(run / "tensorboard").Scalars("val_accuracy")] == [0.25, 0.75]
    client = MlflowClient(mlflow_uri(cfg, str(tmp_path / "runs")))
    assert len(client.search_runs([client.get_experiment_by_name("toy").experiment_id])) == 1


def test_flatten_makes_dotted_keys_and_strings_of_lists_and_none():
    assert flatten({"a": {"b": 1, "c": [1, 2], "d": None, "e": {}}, "f": True}) == {
        "a.b": 1, "a.c": "[1, 2]", "a.d": "None", "a.e": "{}", "f": True}


def test_an_unreachable_mlflow_server_warns_and_training_goes_on(tmp_path, data_dir, caplog, monkeypatch):
    cfg = _cfg(data_dir, tmp_path / "runs", "tensorboard", "mlflow")
    cfg.train.mlflow_uri = "http://127.0.0.1:9"  # the discard port: nothing answers
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    _train(cfg, tmp_path / "runs" / "r1")
    assert "MLflow at http://127.0.0.1:9 unavailable" in caplog.text
    assert [e.value for e in _events(tmp_path / "runs" / "r1" / "tensorboard").Scalars("val_accuracy")] == [
        0.25, 0.5]


def _status(cfg, storage: Path, run: Path) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri(cfg, str(storage)))
    return client.get_run(find_mlflow_run(client, "toy", str(run))).info.status


def test_a_failed_run_ends_failed_an_interrupted_one_killed_and_others_stay(tmp_path, data_dir):
    from mmfusion.train.tracking import end_run, end_status

    storage = tmp_path / "runs"
    cfg = _cfg(data_dir, storage, "mlflow")
    runs = [storage / f"r{i}" for i in range(3)]
    for run in runs:  # rank 0 logs the epochs and leaves the run RUNNING for the driver
        t = Tracker(cfg, str(run))
        t.log_epoch(METRICS[0])
        t.close()
    end_run(cfg, str(runs[0]), end_status(RuntimeError("worker died")))
    end_run(cfg, str(runs[1]), end_status(KeyboardInterrupt()))
    assert [_status(cfg, storage, r) for r in runs] == ["FAILED", "KILLED", "RUNNING"]
    # a whole Tune experiment
    end_run(cfg, None, "KILLED", experiment="toy", uri=mlflow_uri(cfg, str(storage)))
    assert [_status(cfg, storage, r) for r in runs] == ["FAILED", "KILLED", "KILLED"]  # ended runs kept


@pytest.mark.parametrize(("error", "status"),
                         [(KeyboardInterrupt(), "KILLED"), (RuntimeError("x"), "FAILED")])
def test_run_training_ends_the_mlflow_run_when_fit_stops(tmp_path, data_dir, monkeypatch, error, status):
    """run_training owns the tracking's end (cli, jobs and scripts alike): a fit that raises leaves no RUNNING
    run behind, and the error still reaches the caller."""
    import sys
    import types

    import mmfusion.runtime
    from mmfusion.train import trainer

    storage = tmp_path / "runs"
    cfg = _cfg(data_dir, storage, "mlflow")
    cfg.train.run_name = "r1"
    t = Tracker(cfg, str(storage / "r1"))  # what rank 0 opened before the fit stopped
    t.log_epoch(METRICS[0])

    class Trainer:
        def fit(self):
            raise error

    bundle = types.SimpleNamespace(train=None, val=None, train_rows=1, val_rows=0, labels=["1"],
                                   num_rejected=0)
    monkeypatch.setattr(mmfusion.runtime, "init_ray", lambda address=None: None)
    monkeypatch.setattr(mmfusion.runtime, "check_fits", lambda *a, **k: None)
    monkeypatch.setitem(sys.modules, "mmfusion.data.pipeline",
                        types.SimpleNamespace(build_datasets=lambda *a, **k: bundle))
    monkeypatch.setattr(trainer, "with_embedding_cache", lambda cfg, d, info: (d, info, None))
    monkeypatch.setattr(trainer, "data_info", lambda b: {})
    monkeypatch.setattr(trainer, "build_trainer", lambda *a, **k: Trainer())
    with pytest.raises(type(error)):
        trainer.run_training(cfg)
    assert _status(cfg, storage, storage / "r1") == status


def test_step_scalars_go_beside_the_epoch_ones_and_a_resume_drops_repeated_steps(tmp_path, data_dir):
    from mlflow.tracking import MlflowClient

    cfg = _cfg(data_dir, tmp_path / "runs", "tensorboard", "mlflow")
    run = tmp_path / "runs" / "r1"
    first = Tracker(cfg, str(run))
    for step, loss in ((50, 2.0), (100, 1.5)):
        first.log_step(step, {"train_loss": loss, "lr": 1e-3})
    first.log_epoch(METRICS[0])
    first.close()
    again = Tracker(cfg, str(run), start_epoch=1)  # resumed: step 100 was lost with the crashed epoch
    again.log_step(100, {"train_loss": 1.25, "lr": 1e-3})
    again.close()
    steps = _events(run / "tensorboard" / "steps")
    assert [(e.step, e.value) for e in steps.Scalars("train_loss_step")] == [(50, 2.0), (100, 1.25)]
    assert [e.step for e in _events(run / "tensorboard").Scalars("train_loss")] == [0]  # the epoch axis
    client = MlflowClient(mlflow_uri(cfg, str(tmp_path / "runs")))
    history = client.get_metric_history(first.run_id, "train_loss_step")
    assert sorted(m.step for m in history) == [50, 100, 100]  # MLflow keeps every point it was sent


def test_log_every_n_steps_is_validated_and_kept_out_of_the_run_name(data_dir):
    from mmfusion.errors import ConfigError
    from mmfusion.train.trainer import default_run_name

    with pytest.raises(ConfigError, match="log_every_n_steps"):
        validate_config({"data": {"path": str(data_dir)}, "train": {"log_every_n_steps": -1}})
    a, b = (validate_config({"data": {"path": str(data_dir)}, "train": {"log_every_n_steps": n}})
            for n in (0, 7))
    assert default_run_name(a) == default_run_name(b)  # how often to log, not what to train: same run


def test_run_and_tune_names_follow_what_is_trained_not_keys_left_at_their_defaults(data_dir):
    """A key set to its default (as a key a later mmfusion adds with a default would be) or a key saying where
    to store renames neither the run nor the Tune experiment, so the same command resumes them; a changed
    value does."""
    from mmfusion.train.trainer import default_run_name
    from mmfusion.tune.runner import experiment_name

    def cfg(train: dict, optim: dict | None = None):
        return validate_config({"data": {"path": str(data_dir)}, "train": train, "optim": optim or {},
                                "tune": {"space": {"optim.lr": {"choice": [0.1, 0.01]}}}})

    plain = cfg({})
    explicit = cfg({"epochs": plain.train.epochs, "log_every_n_steps": plain.train.log_every_n_steps})
    stored = cfg({"storage_path": "/elsewhere", "tracking": ["tensorboard"]})
    other = cfg({}, {"lr": 0.123})
    assert default_run_name(plain) == default_run_name(explicit) == default_run_name(stored)
    assert experiment_name(plain) == experiment_name(explicit) == experiment_name(stored)
    assert default_run_name(other) != default_run_name(plain)
    assert experiment_name(other) != experiment_name(plain)
