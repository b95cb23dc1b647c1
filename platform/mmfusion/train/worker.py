"""Ray Train glue: the function every DDP worker runs. All learning logic is in loop.py.

Ray-specific lines are marked [ray]. Every rank calls ray.train.report each epoch (it is a barrier);
rank 0 alone writes the checkpoint. A (re)started worker group resumes from ray.train.get_checkpoint().

train_loop_config: {"experiment": the resolved config as a dict, "labels": class names, "spec": InputSpec
fields, "train_rows": int, "class_counts": train rows per class (class weights, majority-class baseline)}.
"""

from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path
from typing import Any

import torch

from mmfusion.batch import InputSpec
from mmfusion.config import validate_config
from mmfusion.errors import ConfigError, MmfusionError
from mmfusion.logs import worker_logging
from mmfusion.train.allocator import tune_malloc
from mmfusion.train.checkpoint import LoopState, resume, save_checkpoint
from mmfusion.train.loop import (
    beats_majority,
    build_optimizer,
    build_scheduler,
    class_weights,
    evaluate,
    grad_scaler,
    majority_share,
    param_groups,
    train_one_epoch,
)
from mmfusion.train.tracking import open_tracker

log = logging.getLogger("mmfusion.train")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def _quiet_ray_train_logs() -> None:
    """Ray Train logs every report and checkpoint at INFO with the full metrics dict; our epoch line
    says it."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:  # this module's logger is named after its file path, not its module
        from ray.train.v2._internal.execution import context as _ctx

        logging.getLogger(_ctx.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass


def user_error(e: BaseException, context: str) -> MmfusionError | None:
    """`context: <message>` of the MmfusionError a worker raised, out of Ray Train's TrainingFailedError, as
    an error of the same class where it takes one message (else a MmfusionError); None when there is none.

    Ray Train V2 wraps worker exceptions in WorkerGroupError.worker_failures (rank -> exception); the user
    should read our one-line message (e.g. the diverged loss's epoch and step), not a worker traceback.
    """
    failures = getattr(e, "worker_failures", None) or {}
    for rank in sorted(failures):
        err = failures[rank]
        err = getattr(err, "_base_exc", err)  # UserExceptionWithTraceback, when not unwrapped already
        if isinstance(err, MmfusionError):
            try:
                return type(err)(f"{context}: {err}")
            except TypeError:  # a subclass with another constructor (DecodeError)
                return MmfusionError(f"{context}: {err}")
    return None


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    import ray.train
    import ray.train.torch

    from mmfusion.data.local_shard import LocalShard, NextEpoch, shard_batches
    from mmfusion.models.model import build_model
    from mmfusion.train.embedding_cache import cached_model

    cfg = validate_config(config["experiment"], source="train_loop_config")  # re-validated on the worker
    labels: list[str] = config["labels"]
    spec = InputSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in config["spec"].items()})
    tc, oc = cfg.train, cfg.optim
    ctx = ray.train.get_context()  # [ray]
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    worker_logging(rank)  # INFO on rank 0, formatted like the driver's lines
    _quiet_ray_train_logs()
    # this function runs in a thread of the worker actor: keep its malloc arena from refaulting each step
    if applied := tune_malloc():
        log.debug("glibc malloc: %s", ", ".join(f"{k} {v // 2**20} MiB" for k, v in applied.items()))
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    torch.manual_seed(cfg.seed)

    model = build_model(cfg.model, spec, num_classes=len(labels))
    cache = config.get("embedding_cache")  # frozen encoders: the shards hold their embeddings, not inputs
    if cache:
        model = cached_model(model, cache)  # the same modules: checkpoints hold the whole model
    batch_spec = None if cache else spec  # what the collate step needs (uint8 image normalization)
    optimizer = build_optimizer(param_groups(model, oc.lr, oc.weight_decay, oc.encoder_lr), oc.name, oc.lr,
                                oc.weight_decay, oc.momentum)
    counts: list[int] = list(config.get("class_counts") or [])
    if oc.class_weights != "none" and len(counts) != len(labels):
        raise ConfigError(f"optim.class_weights={oc.class_weights} needs the train split's class counts "
                          f"(got {len(counts)} for {len(labels)} classes)")
    weight = class_weights(counts, oc.class_weights)  # (K,) or None
    if weight is not None:
        shown = (f"{lab} {w:.2f}" for lab, w in zip(labels, weight.tolist(), strict=True))
        log.info("class weights: %s", ", ".join(shown))
    share = majority_share(counts) if len(counts) == len(labels) else None
    steps_per_epoch = max(1, math.ceil(config["train_rows"] / (tc.batch_size * world)))
    scheduler = build_scheduler(optimizer, oc.scheduler, steps_per_epoch * tc.epochs,
                                warmup_steps=int(oc.warmup_epochs * steps_per_epoch))
    device = ray.train.torch.get_device()  # [ray]
    scaler = grad_scaler(device, tc.precision)  # enabled for fp16 only
    state = LoopState()
    # [ray] set after a worker failure or when a run with this name is re-run
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:  # weights, then placement (DDP + device), then the optimizer state
            model, state = resume(Path(d), model, optimizer, scheduler, scaler, ray.train.torch.prepare_model)
        log.info("resuming from the checkpoint of epoch %d", state.epoch)
    else:
        model = ray.train.torch.prepare_model(model)  # [ray] DDP + device placement
    start = state.epoch + 1
    state.starts.append(start)
    tracker = open_tracker(cfg, config.get("tracking"), start)  # rank 0: TensorBoard/MLflow (train.tracking)

    every = tc.log_every_n_steps if tracker.active else 0  # rank 0 only: the others' tracker is off
    step_count = [start * steps_per_epoch]  # global optimizer steps (approximate after a resume)

    def on_step(_: int, loss: float) -> None:
        step_count[0] += 1
        if step_count[0] % every == 0:
            lr = oc.lr * scheduler.get_last_lr()[0] / scheduler.base_lrs[0]  # the head's, as per epoch
            tracker.log_step(step_count[0], {"train_loss": loss, "lr": lr})

    train_shard = ray.train.get_dataset_shard("train")  # [ray]
    first_step_at: float | None = None  # wall clock of this start's first training step (start-up benches)
    val_shard = ray.train.get_dataset_shard("val")  # [ray]
    # materialized splits that fit (trainer.keep_local_shards): epochs after this start's first read the
    # rank's own copy instead of streaming the object store through Ray Data again
    local = bool(config.get("local_shards"))
    train_local = LocalShard(train_shard, batch_spec, device) if local else None
    val_local = LocalShard(val_shard, batch_spec, device) if local else None

    def train_batches(epoch: int) -> Any:  # spec: the collate step normalizes the uint8 images
        return shard_batches(train_shard, train_local, tc.batch_size, batch_spec, cfg.seed + epoch, device)

    ahead: NextEpoch | None = None  # streamed data: the next epoch's stream, started before validation
    for epoch in range(start, tc.epochs):
        if state.stopped_early:
            break
        batches = ahead.batches() if ahead is not None else train_batches(epoch)
        tr = train_one_epoch(model, batches, optimizer, scheduler, device, tc.precision, oc.grad_clip,
                             epoch=epoch, class_weight=weight, label_smoothing=oc.label_smoothing,
                             num_classes=len(labels), scaler=scaler, on_step=on_step if every else None)
        streamed_next = not local and epoch + 1 < tc.epochs  # (an early stop below leaves it unread)
        ahead = NextEpoch(lambda e=epoch + 1: train_batches(e)) if streamed_next else None
        val_batches = shard_batches(val_shard, val_local, tc.batch_size, batch_spec, None, device)
        va = evaluate(model, val_batches, device, tc.precision, num_classes=len(labels))
        metrics = {"epoch": epoch, "train_loss": tr.loss, "train_accuracy": tr.accuracy, "val_loss": va.loss,
                   "val_accuracy": va.accuracy, "val_macro_f1": va.macro_f1,
                   "val_balanced_accuracy": va.balanced_accuracy,
                   "lr": oc.lr * scheduler.get_last_lr()[0] / scheduler.base_lrs[0],  # the head's (optim.lr)
                   "samples_per_s": tr.samples_per_s, "world_size": world,
                   # time blocked on the batch iterator (this rank), the first batch's apart: bench/ingest.py
                   "data_wait_s": tr.data_wait_s, "data_first_wait_s": tr.data_first_wait_s}
        value = metrics.get(tc.metric)
        if value is None:
            raise ValueError(f"train.metric {tc.metric!r} is not reported; choose one of {sorted(metrics)}")
        if state.improved(value, tc.mode):
            state.best_metric, state.best_epoch, state.bad_epochs = value, epoch, 0
        else:
            state.bad_epochs += 1
        state.epoch = epoch
        state.history.append(metrics)
        first_step_at = first_step_at or tr.first_step_at
        state.stopped_early = bool(tc.early_stopping_patience
                                   and state.bad_epochs >= tc.early_stopping_patience)
        if share is not None:  # the verdict so far; the last checkpoint's is the run's (metrics.json)
            state.majority_share = share
            state.learned = beats_majority([h["train_accuracy"] for h in state.history], share)
        log.info("epoch %d/%d  train loss %.4f acc %.4f | val loss %.4f acc %.4f macro-F1 %.4f | "
                 "%.0f samples/s%s", epoch + 1, tc.epochs, tr.loss, tr.accuracy, va.loss, va.accuracy,
                 va.macro_f1, tr.samples_per_s, "  (early stop)" if state.stopped_early else "")
        tracker.log_epoch(metrics)
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                save_checkpoint(Path(d), unwrap(model).state_dict(),
                                {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                 "scaler": scaler.state_dict()}, state)
                checkpoint = ray.train.Checkpoint.from_directory(d)  # [ray]
            ray.train.report(metrics, checkpoint=checkpoint)  # [ray] every rank reports
    if state.learned is False and rank == 0:
        log.warning("train accuracy never beat the majority class share %.3f (best %.3f): the model predicts "
                    "(nearly) one class. Try optim.class_weights=balanced, another optim.lr or "
                    "optim.encoder_lr, or check the inputs (mmfusion data inspect)", state.majority_share,
                    max(h["train_accuracy"] for h in state.history))
    tracker.close()
    return {"epoch": state.epoch, "starts": state.starts, "first_step_at": first_step_at}
