"""Experiment tracking: TensorBoard and MLflow through their own libraries, written by rank 0.

    tracker = open_tracker(cfg, config.get("tracking"), start_epoch)  # every worker; a no-op off rank 0
    tracker.log_epoch(metrics)                 # one scalar per reported metric, step = epoch
    tracker.log_step(step, {"train_loss": x})  # every train.log_every_n_steps: <name>_step at the global step
    tracker.close()
    finish_run(cfg, run_location, artifact)    # the driver, once the artifact exists: its PNGs as TensorBoard
                                               # images, the folder as MLflow artifacts, driver-only tags
    end_run(cfg, run_location, "FAILED")       # the driver, when the run failed (KILLED: interrupted)

Where things go (`train.tracking` picks the trackers; default [tensorboard]):
    TensorBoard  <run folder>/tensorboard: scalars per epoch and the resolved config as hparams, so that
                 `tensorboard --logdir runs` shows every run's curves and HParams lines up Tune trials.
    MLflow       train.mlflow_uri (default file:<storage_path>/mlruns, a local file store); experiment = the
                 dataset's name, or the Tune experiment's name for its trials. A run folder maps to one MLflow
                 run, found again by its tag mmfusion.run_path: a resumed run continues its MLflow run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from mmfusion.config import ExperimentConfig
from mmfusion.storage import is_remote, publish, staging_dir

log = logging.getLogger(__name__)

RUN_PATH_TAG = "mmfusion.run_path"
# the HParams view shows these as metric columns (each is a scalar tag of the same name in the run)
HPARAM_METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_macro_f1",
                  "val_balanced_accuracy")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and None become strings (what hparams and params accept)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{key}."))
        elif isinstance(v, bool | int | float | str):
            out[key] = v
        else:
            out[key] = json.dumps(v) if isinstance(v, list | dict) else str(v)
    return out


def mlflow_uri(cfg: ExperimentConfig, storage: str) -> str | None:
    """train.mlflow_uri, else a file store in <storage>/mlruns (None for remote storage: MLflow's file store
    is local, so a cluster run on s3:// or gs:// needs a tracking server in train.mlflow_uri)."""
    if cfg.train.mlflow_uri:
        return cfg.train.mlflow_uri
    if is_remote(storage):
        return None
    return f"file:{Path(storage).absolute() / 'mlruns'}"


def default_experiment(cfg: ExperimentConfig) -> str:
    """The MLflow experiment of a plain training run: the dataset's folder (or manifest) name."""
    return Path(cfg.data.path.rstrip("/")).stem or "mmfusion"


def git_commit(where: str | Path | None = None) -> str | None:
    """The commit of the code being run (the mmfusion package's checkout, else the current folder)."""
    for d in (Path(__file__).resolve().parent, Path(where or ".").absolute()):
        try:
            out = subprocess.run(["git", "-C", str(d), "rev-parse", "HEAD"], capture_output=True, text=True,
                                 timeout=5, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    return None


def dataset_fingerprint(path: str) -> str | None:
    """sha256 over the dataset's files (name, size, modification time): changes when any file changes."""
    from mmfusion.data.readers import discover
    from mmfusion.storage import filesystem

    try:
        h = hashlib.sha256()
        for src in discover(path):
            fs, inner = filesystem(src.location)
            info = fs.get_file_info(inner)
            h.update(f"{src.name}\0{info.size}\0{info.mtime_ns}\n".encode())
        return h.hexdigest()[:16]
    except (OSError, ValueError) as e:
        log.debug("no dataset fingerprint for %s: %s", path, e)
        return None


class Tracker:
    """Rank 0's writers. Every method is safe to call when a tracker is off (`enabled=False`)."""

    def __init__(self, cfg: ExperimentConfig, run_location: str, start_epoch: int = 0,
                 experiment: str | None = None, uri: str | None = None, enabled: bool = True) -> None:
        self.writer: Any = None
        self.step_writer: Any = None  # train.log_every_n_steps' scalars (<tensorboard>/steps), on first use
        self.mlflow: Any = None  # MlflowClient
        self.run_id: str | None = None
        self.tb_location = f"{run_location.rstrip('/')}/tensorboard"
        if not enabled:
            return
        hp = flatten(cfg.model_dump(mode="json"))
        if "tensorboard" in cfg.train.tracking:
            self.writer = _open_writer(self.tb_location, hp, cfg.train.metric, start_epoch)
        if "mlflow" in cfg.train.tracking:
            uri = uri or mlflow_uri(cfg, run_location.rstrip("/").rsplit("/", 1)[0])
            if uri is None:
                log.warning("train.tracking has mlflow but storage %s is remote and train.mlflow_uri is not "
                            "set: not logging to MLflow", run_location)
            else:
                name = Path(run_location.rstrip("/")).name
                try:
                    self.mlflow, self.run_id = open_mlflow_run(uri, experiment or default_experiment(cfg),
                                                               run_location, name, hp)
                except Exception as e:  # a tracking server that is down must not stop the training
                    log.warning("MLflow at %s unavailable, not logging to it: %s: %s", uri,
                                type(e).__name__, e)

    @property
    def active(self) -> bool:
        return self.writer is not None or self.mlflow is not None

    def log_epoch(self, metrics: dict[str, Any]) -> None:
        step = int(metrics.get("epoch", 0))
        self._write({k: float(v) for k, v in metrics.items()
                     if k != "epoch" and isinstance(v, int | float) and not isinstance(v, bool)}, step)

    def log_step(self, step: int, scalars: dict[str, float]) -> None:
        """One optimizer step's scalars (train.log_every_n_steps), as `<name>_step` at the global step (the
        per-epoch scalars keep their own names and the epoch axis). TensorBoard: in <tensorboard>/steps, a
        writer of its own whose purge step is the first step logged, so a resumed run drops the steps it
        repeats there too (the epoch writer purges by epoch)."""
        if self.writer is not None and self.step_writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.step_writer = SummaryWriter(str(Path(self.writer.log_dir) / "steps"), purge_step=step)
        self._write({f"{k}_step": float(v) for k, v in scalars.items()}, step, self.step_writer)

    def _write(self, scalars: dict[str, float], step: int, writer: Any = None) -> None:
        writer = writer or self.writer
        if writer is not None:
            for k, v in scalars.items():
                writer.add_scalar(k, v, step)
            writer.flush()  # a running `tensorboard` shows each point as it comes
        if self.mlflow is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            try:
                batch = [Metric(k, v, now, step) for k, v in scalars.items()]
                self.mlflow.log_batch(self.run_id, metrics=batch)
            except Exception as e:
                log.warning("MLflow logging failed, not logging to it any more: %s: %s", type(e).__name__, e)
                self.mlflow = None

    def close(self) -> None:
        if self.step_writer is not None:
            self.step_writer.close()
            self.step_writer = None
        if self.writer is not None:
            from torch.utils.tensorboard.summary import hparams

            _, _, session_end = hparams({"_": 0}, {})
            self.writer.file_writer.add_summary(session_end)
            self.writer.close()
            publish(Path(self.writer.log_dir), self.tb_location)
            self.writer = None
        self.mlflow = None  # the run stays RUNNING until the driver has logged the artifact (finish_run)


def open_tracker(cfg: ExperimentConfig, info: dict[str, Any] | None, start_epoch: int) -> Tracker:
    """The tracker of this Ray Train worker: real on rank 0, off elsewhere. `info` (a Tune trial's) may name
    the MLflow experiment and URI; the run folder comes from Ray Train's storage context."""
    import ray.train

    ctx = ray.train.get_context()
    if ctx.get_world_rank() != 0 or not cfg.train.tracking:
        return Tracker(cfg, "", enabled=False)
    info = info or {}
    return Tracker(cfg, run_location(ctx.get_storage()), start_epoch, experiment=info.get("experiment"),
                   uri=info.get("mlflow_uri"))


def run_location(storage: Any) -> str:
    """Ray Train's run folder as a path (local storage) or a URI."""
    fs_type = storage.storage_filesystem.type_name
    path = storage.experiment_fs_path
    return path if fs_type == "local" else f"{ {'gcs': 'gs'}.get(fs_type, fs_type)}://{path}"


def _open_writer(location: str, hp: dict[str, Any], metric: str, start_epoch: int) -> Any:
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    local = staging_dir(location)
    # a resumed run drops the events of the epochs it repeats (purge_step), so curves never fold back
    writer = SummaryWriter(str(local), purge_step=start_epoch or None)
    metrics = dict.fromkeys(dict.fromkeys([*HPARAM_METRICS, metric]), 0.0)
    experiment, session_start, _ = hparams(hp, metrics)  # in this run's own event file (not a sub-run)
    writer.file_writer.add_summary(experiment)
    writer.file_writer.add_summary(session_start)
    return writer


def _client(uri: str) -> Any:
    if uri.startswith("file:") or "://" not in uri:
        # MLflow 3 keeps its file store in maintenance mode behind this switch; it is the zero-setup default
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _experiment_id(client: Any, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # another trial created it first
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def find_mlflow_run(client: Any, experiment: str, run_location: str) -> str | None:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{RUN_PATH_TAG}` = '{run_location}'",
                              max_results=1)
    return runs[0].info.run_id if runs else None


def open_mlflow_run(uri: str, experiment: str, run_location: str, run_name: str,
                    params: dict[str, Any]) -> tuple[Any, str]:
    """The MLflow run of this run folder: created with the config as params, or found again (resumed)."""
    from mlflow.entities import Param

    client = _client(uri)
    exp_id = _experiment_id(client, experiment)
    run_id = find_mlflow_run(client, experiment, run_location)
    if run_id is None:
        run = client.create_run(exp_id, run_name=run_name, tags={RUN_PATH_TAG: run_location})
        run_id = run.info.run_id
        items = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(run_id, params=items[i:i + 100])
    else:
        client.update_run(run_id, status="RUNNING")
    log.info("MLflow run %s (experiment %s) at %s", run_id, experiment, uri)
    return client, run_id


def finish_run(cfg: ExperimentConfig, run_loc: str, artifact: Path | None, *, experiment: str | None = None,
               uri: str | None = None, extra: Path | None = None, step: int = 0,
               status: str = "FINISHED") -> None:
    """Driver side, after training: the artifact's PNGs into TensorBoard, and into the run's MLflow run the
    artifact folder (and `extra` as "checkpoint": a Tune trial's last one), tags and `status` (FINISHED, or
    FAILED for a Tune trial that errored)."""
    if "tensorboard" in cfg.train.tracking and artifact is not None:
        log_images(f"{run_loc.rstrip('/')}/tensorboard", sorted(Path(artifact).glob("*.png")), step)
    if "mlflow" not in cfg.train.tracking:
        return
    uri = uri or mlflow_uri(cfg, run_loc.rstrip("/").rsplit("/", 1)[0])
    if uri is None:
        return
    try:
        _finish_mlflow(cfg, run_loc, artifact, experiment, uri, extra, status)
    except Exception as e:  # the run is trained and its artifact written: report, don't fail it
        log.warning("MLflow at %s: could not log the artifact of %s: %s: %s", uri, run_loc,
                    type(e).__name__, e)


def _finish_mlflow(cfg: ExperimentConfig, run_loc: str, artifact: Path | None, experiment: str | None,
                   uri: str, extra: Path | None, status: str) -> None:
    client = _client(uri)
    run_id = find_mlflow_run(client, experiment or default_experiment(cfg), run_loc)
    if run_id is None:
        log.warning("no MLflow run for %s in %s: nothing logged there", run_loc, uri)
        return
    tags = {"run_name": Path(run_loc.rstrip("/")).name, "dataset": cfg.data.path,
            "dataset_fingerprint": dataset_fingerprint(cfg.data.path), "git_commit": git_commit()}
    for k, v in tags.items():
        if v:
            client.set_tag(run_id, k, v)
    if artifact is not None:
        client.log_artifacts(run_id, str(artifact), "artifact")
    if extra is not None:
        client.log_artifacts(run_id, str(extra), "checkpoint")
    client.set_terminated(run_id, status)


def end_status(error: BaseException) -> str:
    """MLflow's end status of a run stopped by `error`: KILLED when a person or a signal stopped it."""
    return "KILLED" if isinstance(error, KeyboardInterrupt | SystemExit) else "FAILED"


def end_run(cfg: ExperimentConfig, run_loc: str | None, status: str, *, experiment: str | None = None,
            uri: str | None = None) -> None:
    """Driver side, when a run (run_loc) or every run of a Tune experiment (run_loc None, `experiment` named)
    failed or was interrupted: its MLflow runs that rank 0 left RUNNING end as `status` (FAILED or KILLED),
    so that MLflow never lists a dead run as running. Never raises: the run's own error is the one to see."""
    if "mlflow" not in cfg.train.tracking:
        return
    uri = uri or (mlflow_uri(cfg, run_loc.rstrip("/").rsplit("/", 1)[0]) if run_loc else None)
    if uri is None:
        return
    try:
        client = _client(uri)
        exp = client.get_experiment_by_name(experiment or default_experiment(cfg))
        if exp is None:
            return
        where = "attributes.status = 'RUNNING'"
        if run_loc is not None:
            where += f" and tags.`{RUN_PATH_TAG}` = '{run_loc}'"
        for run in client.search_runs([exp.experiment_id], filter_string=where):
            client.set_terminated(run.info.run_id, status)
            log.info("MLflow run %s (%s) ended as %s", run.info.run_id, run.info.run_name, status)
    except Exception as e:
        log.warning("MLflow at %s: could not end the runs of %s as %s: %s: %s", uri, run_loc or experiment,
                    status, type(e).__name__, e)


def log_images(location: str, pngs: list[Path], step: int) -> None:
    """PNG files as TensorBoard images (tag = file stem) in the event folder at `location`."""
    if not pngs:
        return
    import numpy as np
    from PIL import Image
    from torch.utils.tensorboard import SummaryWriter

    local = staging_dir(location)
    with SummaryWriter(str(local)) as w:
        for png in pngs:
            with Image.open(png) as im:
                w.add_image(png.stem, np.asarray(im.convert("RGB")), step, dataformats="HWC")  # (H, W, 3)
    publish(local, location)
