"""Tracking and readable logs on a real local cluster: a 2-epoch `mmfusion train` and the session's 3-trial
ASHA search (conftest.py::asha_tune), read back with TensorBoard's EventAccumulator and MLflow's client (the
file store under the storage path)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

TRACKING = "train.tracking=[tensorboard, mlflow]"
# a line of mmfusion's own: the driver's format, also used by the workers (mmfusion.logs.worker_logging)
OURS = re.compile(r"\d\d:\d\d:\d\d (?:DEBUG|INFO|WARNING|ERROR|CRITICAL) mmfusion[.:]")
EPOCH = re.compile(r"mmfusion\.train: epoch \d+/\d+ ")


def _events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def _mlflow_run(storage: Path, experiment: str, run_dir: Path):
    from mlflow.tracking import MlflowClient

    from mmfusion.train.tracking import find_mlflow_run

    client = MlflowClient(f"file:{storage / 'mlruns'}")
    run_id = find_mlflow_run(client, experiment, str(run_dir))
    assert run_id is not None, f"no MLflow run tagged with {run_dir}"
    return client, client.get_run(run_id)


def test_train_logs_every_epoch_to_tensorboard_and_mlflow_and_prints_no_ray_lines(tracked_streamed_train,
                                                                                  avt_tiny, monkeypatch):
    """`mmfusion train` as a user runs it: its own process (a fresh driver, so Ray's once-per-process lines,
    such as core_worker's of ray#53727, would show), joined to the session's cluster (conftest.py's
    tracked_streamed_train, which test_streaming_train.py reads too)."""
    proc, storage = tracked_streamed_train.proc, tracked_streamed_train.storage
    err = proc.stderr.splitlines()
    assert proc.returncode == 0, proc.stderr[-3000:]
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # as mmfusion sets it for its file store

    run_dir = tracked_streamed_train.run_dir
    metrics = json.loads((run_dir / "artifact" / "metrics.json").read_text())
    reported = [k for k in metrics["history"][0] if k != "epoch"]
    acc = _events(run_dir / "tensorboard")
    for key in reported:  # every scalar the workers reported, once per epoch
        assert [e.step for e in acc.Scalars(key)] == [0, 1], key
    assert [e.value for e in acc.Scalars("val_accuracy")] == pytest.approx(
        [h["val_accuracy"] for h in metrics["history"]])
    assert {"training_curves", "confusion_matrix_val"} <= set(acc.Tags()["images"])
    assert "_hparams_/experiment" in acc.PluginTagToContent("hparams")
    steps = [e.step for e in _events(run_dir / "tensorboard" / "steps").Scalars("train_loss_step")]
    assert steps and all(s % 2 == 0 for s in steps) and steps == sorted(steps)  # every 2nd global step

    client, run = _mlflow_run(storage, avt_tiny.name, run_dir)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.fusion.dim"] == "32" and run.data.params["train.epochs"] == "2"
    for key in reported:
        assert len(client.get_metric_history(run.info.run_id, key)) == 2, key
    assert run.data.tags["run_name"] == "tracked" and len(run.data.tags["dataset_fingerprint"]) == 16
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "artifact")}
    assert {"artifact/model.safetensors", "artifact/config.yaml", "artifact/metrics.json"} <= artifacts

    # readable logs: every line the run printed is mmfusion's, from the start (data, start-up) to the end
    assert sum(bool(EPOCH.search(line)) for line in err) == 2
    others = [line for line in err if line.strip() and not OURS.search(line)]
    assert others == [], "\n".join(others)


def test_each_tune_trial_logs_params_metrics_and_an_artifact(asha_tune):
    """Every trial of the session's ASHA search (conftest.py::asha_tune, tracking on): the good one ran all
    3 epochs, the stopped ones fewer; each logs every epoch it trained, once."""
    from mlflow.tracking import MlflowClient

    run, storage = asha_tune.run, asha_tune.storage
    assert len(run.rows) == 3
    epochs = {str(r["trial_id"]): int(r["epochs"]) for r in run.rows}
    assert max(epochs.values()) == 3 and min(epochs.values()) < 3  # a full trial and a stopped one
    client = MlflowClient(f"file:{storage / 'mlruns'}")
    exp = client.get_experiment_by_name(run.name)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 3
    assert {r.data.params["optim.lr"] for r in runs} == {"0.003", "1e-07"}
    for r in runs:
        assert r.info.status == "FINISHED"
        assert client.list_artifacts(r.info.run_id), r.info.run_name  # artifact/ (best) or checkpoint/
        trial_dir = Path(r.data.tags["mmfusion.run_path"])
        assert trial_dir.parent == storage / run.name / "train"
        ran = epochs[trial_dir.name.removeprefix("trial-")]
        acc = _events(trial_dir / "tensorboard")
        # once per epoch the trial trained: a stopped trial's worker may finish one more epoch than the one
        # ASHA judged before the stop reaches it, so its logs can run past Tune's count, never under it
        for steps in (sorted(m.step for m in client.get_metric_history(r.info.run_id, "val_loss")),
                      [e.step for e in acc.Scalars("val_accuracy")]):
            assert steps == list(range(len(steps))) and ran <= len(steps) <= 3, (ran, steps)
        assert "_hparams_/session_start_info" in acc.PluginTagToContent("hparams")
    best = [r for r in runs if r.data.tags["mmfusion.run_path"].endswith(f"trial-{run.best_id}")]
    names = {a.path for a in client.list_artifacts(best[0].info.run_id, "artifact")}
    assert "artifact/model.safetensors" in names
