"""The driver side of training: datasets -> TorchTrainer -> artifact. Read it top to bottom.

    run = run_training(cfg)            # resumes when <storage_path>/<run_name> already holds checkpoints
    run.artifact                       # the artifact folder (model.safetensors, config.yaml, ...)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mmfusion.config import ExperimentConfig
from mmfusion.errors import MmfusionError

log = logging.getLogger(__name__)
LOCAL_SHARD_MEMORY_SHARE = 0.2  # of the machine's RAM: the most workers' copies of materialized splits use


@dataclass
class TrainRun:
    name: str
    path: Path  # <storage_path>/<name>: Ray Train's run folder (checkpoints)
    artifact: Path  # a local folder (for remote storage: the staged copy of `location`)
    metrics: dict[str, Any]
    location: str = ""  # where the artifact lives: a local path or an s3:// / gs:// URI


# train keys that say how and where to run, not what to train: they never rename a run
HOW_TO_RUN = ("max_failures", "artifact_dir", "run_name", "storage_path", "tracking", "mlflow_uri",
              "log_every_n_steps", "embedding_cache_keep")


def config_digest(cfg: ExperimentConfig) -> str:
    """8 hex digits for what a config trains: the values that differ from their defaults, less HOW_TO_RUN and
    data.cache. A key set to its default, or a key a later mmfusion adds with a default, leaves it unchanged,
    so the same command resumes the same run (or Tune experiment) across upgrades."""
    identity = cfg.model_dump(mode="json", exclude_defaults=True)
    for k in HOW_TO_RUN:
        identity.get("train", {}).pop(k, None)
    identity.get("data", {}).pop("cache", None)
    identity = {k: v for k, v in identity.items() if v != {}}  # a section left with nothing to say
    return hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]


def default_run_name(cfg: ExperimentConfig) -> str:
    """Stable for the same resolved config, so re-running the same command resumes the same run."""
    digest = config_digest(cfg)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(cfg.data.path.rstrip("/")).stem) or "data"
    mods = "".join(m[0] for m in cfg.data.modalities)  # e.g. "ita"
    return f"{stem}-{mods}-{cfg.model.fusion.name}-{digest}"


def run_training(cfg: ExperimentConfig, address: str | None = None) -> TrainRun:
    import ray.train

    from mmfusion.data.pipeline import build_datasets
    from mmfusion.runtime import absolute_path, check_fits, env_address, init_ray
    from mmfusion.train.tracking import end_run, end_status, finish_run

    tc = cfg.train
    name = tc.run_name or default_run_name(cfg)
    storage = absolute_path(tc.storage_path)
    embedded = not (address or env_address())
    init_ray(address)
    check_fits(tc.num_workers, tc.cpus_per_worker, tc.use_gpu, strict=embedded)

    # streamed data (data.cache none) preprocesses beside the workers: its pool gets the CPUs they leave
    bundle = build_datasets(cfg.data, splits=("train", "val"), seed=cfg.seed,
                            train_cpus=tc.num_workers * tc.cpus_per_worker)
    log.info("data: %d train rows, %d val rows, %d classes, %d rejected", bundle.train_rows, bundle.val_rows,
             len(bundle.labels), bundle.num_rejected)
    datasets, info, cache = with_embedding_cache(cfg, {"train": bundle.train, "val": bundle.val},
                                                 data_info(bundle))
    trainer = build_trainer(cfg, datasets, info, name, storage, embedded=embedded)
    log.info("training run %s (storage %s): %d worker(s), %s", name, storage, tc.num_workers,
             "GPU" if tc.use_gpu else "CPU")
    run_loc = f"{storage.rstrip('/')}/{name}"  # Ray Train's run folder: the trackers' run (tracking.py)
    try:
        try:
            result = fit(trainer)
        except ray.train.TrainingFailedError as e:
            from mmfusion.train.worker import user_error

            cause = user_error(e, f"training run {name} failed")  # e.g. TrainingDivergedError: its one line
            if cause is not None:
                raise cause from None
            raise MmfusionError(f"training run {name} failed: {e}") from None
        run = export_run(result, cfg, bundle, name, storage,
                         extra={"embedding_cache": cache.summary()} if cache is not None else None)
    except BaseException as e:  # Ctrl-C too: MLflow must not list the run as running forever
        end_run(cfg, run_loc, end_status(e))
        raise
    # the artifact's plots into TensorBoard, the folder into MLflow (rank 0 logged the epochs): here, so
    # `mmfusion train`, jobs and scripts calling run_training all finish their tracking (Tune: finish_trials)
    finish_run(cfg, run_loc, run.artifact, step=int(run.metrics["epochs_run"]) - 1)
    return run


def fit(trainer: Any) -> Any:
    """trainer.fit(), then the SIGINT handler from before it back. In the main thread Ray Train's fit()
    installs a handler (Ctrl-C aborts its controller) and leaves it behind: it would keep the finished run's
    Train controller, dataset manager and split coordinators alive through the evaluation and export that
    follow (~3% of a core on 2 cores, bench/train_overhead.py), and turn a Ctrl-C there into an abort of the
    finished run that export would run on past."""
    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGINT) if main else None
    try:
        return trainer.fit()
    finally:
        if handler is not None:
            signal.signal(signal.SIGINT, handler)


def data_info(bundle: Any) -> dict[str, Any]:
    """What the workers learn from the driver's data pass: class names, input shapes, rows per epoch."""
    return {"labels": bundle.labels, "spec": asdict(bundle.spec), "train_rows": bundle.train_rows,
            "class_counts": bundle.class_counts}  # class weights and the majority-class baseline


def with_embedding_cache(cfg: ExperimentConfig, datasets: dict[str, Any], info: dict[str, Any],
                         ) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """(datasets, info, cache): when every encoder is frozen (embedding_cache.enabled), the splits' cached
    embeddings under train.storage_path (built now if missing) and the info that tells the workers;
    otherwise the arguments unchanged and None."""
    from mmfusion.train import embedding_cache

    if not embedding_cache.enabled(cfg) or "embedding_cache" in info:
        return datasets, info, None
    from mmfusion.runtime import absolute_path

    cache = embedding_cache.embed_splits(cfg, datasets, info, absolute_path(cfg.train.storage_path))
    return cache.datasets, {**info, "embedding_cache": cache.worker_info()}, cache


def build_trainer(cfg: ExperimentConfig, datasets: dict[str, Any], info: dict[str, Any], name: str,
                  storage: str, embedded: bool, callbacks: Sequence[Any] = ()) -> Any:
    """The one TorchTrainer of a run, for `mmfusion train` and for each Tune trial alike.

    Args:
        datasets: {"train", "val"} Ray Datasets, sharded across the workers.
        info: `data_info(bundle)`, passed to every worker beside the experiment config.
        name: the run's folder under `storage`; a stable name makes a re-run resume from its checkpoints.
        storage: an absolute path or URI (workers chdir into their run folder).
        embedded: an embedded local cluster never grows, so workers that cannot be placed fail the run
            (controller_failure_limit=1) instead of waiting forever; a joined cluster may autoscale.
        callbacks: Ray Train callbacks (a Tune trial adds TuneReportCallback).
    Materialized splits stay in the workers' memory after the first epoch (keep_local_shards), unless `info`
    sets "local_shards" itself (bench/train_overhead.py measures both).
    Frozen encoders (train.embedding_cache): the datasets are replaced by their cached embeddings, unless
    `info` says they already are (run_training), so every Tune trial shares the cache too.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from mmfusion.train.worker import train_loop_per_worker

    datasets, info, _ = with_embedding_cache(cfg, datasets, info)
    tc = cfg.train
    experiment = cfg.model_dump(mode="json")
    if tc.num_threads is None:
        experiment["train"]["num_threads"] = worker_threads(tc.num_workers, tc.cpus_per_worker, embedded,
                                                            _streams(datasets))
        log.info("torch threads per worker: %d (train.num_threads unset: the CPUs each worker gets)",
                 experiment["train"]["num_threads"])
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"experiment": experiment, "local_shards": keep_local_shards(datasets), **info},
        scaling_config=ray.train.ScalingConfig(
            num_workers=tc.num_workers, use_gpu=tc.use_gpu,
            resources_per_worker={"CPU": tc.cpus_per_worker} | ({"GPU": 1} if tc.use_gpu else {})),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=tc.checkpoints_to_keep, checkpoint_score_attribute=tc.metric,
                checkpoint_score_order=tc.mode),
            failure_config=ray.train.FailureConfig(
                max_failures=tc.max_failures, controller_failure_limit=1 if embedded else -1),
            callbacks=list(callbacks)),
        datasets=datasets,
    )


def worker_threads(num_workers: int, cpus_per_worker: float, embedded: bool, data_streams: bool) -> int:
    """torch threads per worker when train.num_threads is unset: the CPUs each worker gets.

    That is its cpus_per_worker, except on an embedded (one-machine) cluster whose data is materialized:
    there the data needs no CPU while training, so the workers share all the machine's cores (1 worker on
    2 cores: 2 threads, where a 1-CPU reservation would leave a core idle). While data streams, the
    preprocessing pool keeps the cores the workers do not reserve.
    """
    from mmfusion.runtime import usable_cpus

    own = max(1, int(cpus_per_worker))
    if not embedded or data_streams:
        return own
    return max(own, int(usable_cpus(local=True)) // num_workers)


def keep_local_shards(datasets: dict[str, Any]) -> bool:
    """Whether the workers keep their shards of the splits in their own memory after the first epoch
    (data/local_shard.py): only for materialized splits (nothing to re-read), and only when all of them
    together fit LOCAL_SHARD_MEMORY_SHARE of this machine's memory (the copies add to the object store's)."""
    if _streams(datasets):
        return False
    size = sum(d.size_bytes() for d in datasets.values() if d is not None)
    budget = LOCAL_SHARD_MEMORY_SHARE * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    keep = size <= budget
    log.info("materialized splits (%.0f MiB): %s", size / 2**20,
             "each worker keeps its shard in memory after the first epoch" if keep else
             f"streamed from the object store every epoch (over {budget / 2**30:.1f} GiB to copy to workers)")
    return keep


def _streams(datasets: dict[str, Any]) -> bool:
    """Whether reading the datasets runs Ray Data work during training (anything not materialized)."""
    from ray.data.dataset import MaterializedDataset

    return any(d is not None and not isinstance(d, MaterializedDataset) for d in datasets.values())


def export_run(result: Any, cfg: ExperimentConfig, bundle: Any, name: str, storage: str,
               extra: dict[str, Any] | None = None) -> TrainRun:
    """Best checkpoint -> artifact folder with metrics (plus `extra`), training curves and a val confusion
    matrix (of the whole model on the preprocessed val split, also when it trained on cached embeddings)."""
    from mmfusion.artifact import load_artifact, save_artifact
    from mmfusion.evaluate.plots import plot_training_curves
    from mmfusion.evaluate.report import evaluate_dataset
    from mmfusion.storage import is_remote, publish, staging_dir
    from mmfusion.train.checkpoint import load_loop_state, load_model_state

    latest = result.checkpoint
    if latest is None:
        raise MmfusionError(f"training run {name} produced no checkpoint")
    best = _best_checkpoint(result, cfg.train.metric, cfg.train.mode) or latest
    with latest.as_directory() as d:
        state = load_loop_state(Path(d))  # the latest holds the full history
    with best.as_directory() as d:
        weights = load_model_state(Path(d))
        # the epoch whose weights the artifact holds: on a tie Ray's top-k may have pruned the loop's best
        # (the first of the tied epochs) and kept a later one, so the loop state's best_epoch could name
        # weights that are not there
        kept = load_loop_state(Path(d)).epoch
    best_value = next((h.get(cfg.train.metric) for h in state.history if h.get("epoch") == kept),
                      state.best_metric)
    metrics = {"run_name": name, "best_epoch": kept, f"best_{cfg.train.metric}": best_value,
               "epochs_run": state.epoch + 1, "starts": state.starts, "stopped_early": state.stopped_early,
               "history": state.history, "train_rows": bundle.train_rows, "val_rows": bundle.val_rows,
               "rejected_rows": bundle.num_rejected,
               "learned": state.learned, "majority_share": state.majority_share,  # see loop.beats_majority
               **(extra or {})}
    if state.learned is False:
        log.warning("training run %s never beat the majority class share %.3f on train accuracy: the model "
                    "predicts (nearly) one class (metrics.json: learned=false)", name, state.majority_share)
    location = cfg.train.artifact_dir or f"{storage.rstrip('/')}/{name}/artifact"
    out = staging_dir(location)  # the folder itself, or a local copy published to s3:// / gs:// at the end
    save_artifact(out, weights, cfg, bundle.labels, metrics)
    plot_training_curves(state.history, out / "training_curves.png", title=name)
    val = evaluate_dataset(load_artifact(out), bundle.val, "val")  # confusion matrix of the kept model
    metrics["evaluation"] = {"val": val.report}
    where = publish(out, location)
    log.info("artifact written to %s (best %s %.4f at epoch %d)", where, cfg.train.metric,
             best_value if best_value is not None else float("nan"), kept + 1)
    return TrainRun(name, Path(storage) / name, Path(where) if not is_remote(where) else out, metrics,
                    location=where)


def _best_checkpoint(result: Any, metric: str, mode: str) -> Any:
    """The kept checkpoint with the best `metric`; among equal values the earliest epoch (the loop's rule:
    only a strict improvement moves the best)."""
    scored = [(m[metric], m.get("epoch", 0), c) for c, m in (result.best_checkpoints or [])
              if m.get(metric) is not None]
    if not scored:
        return None
    sign = -1 if mode == "max" else 1
    return min(scored, key=lambda t: (sign * t[0], t[1]))[2]
