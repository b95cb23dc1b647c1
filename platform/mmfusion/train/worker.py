"""Ray Train glue: the function every DDP worker runs. All learning logic is in loop.py.

Ray-specific lines are marked [ray]. Every rank calls ray.train.report each epoch (it is a barrier);
rank 0 alone writes the checkpoint. A (re)started worker group resumes from ray.train.get_checkpoint().
"""

from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path
from typing import Any

import torch

from mmfusion.config import validate_config
from mmfusion.models.spec import InputSpec
from mmfusion.train.checkpoint import LoopState, load_checkpoint, save_checkpoint
from mmfusion.train.loop import build_optimizer, build_scheduler, evaluate, train_one_epoch

log = logging.getLogger("mmfusion.train")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def _quiet_ray_train_logs() -> None:
    """Ray Train logs every report and checkpoint at INFO with the full metrics dict; our epoch line says it."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:  # this module's logger is named after its file path, not its module
        from ray.train.v2._internal.execution import context as _ctx

        logging.getLogger(_ctx.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    import ray.train
    import ray.train.torch

    from mmfusion.data.pipeline import iter_torch_batches
    from mmfusion.models.model import build_model

    cfg = validate_config(config["experiment"], source="train_loop_config")  # re-validated on the worker
    labels: list[str] = config["labels"]
    spec = InputSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in config["spec"].items()})
    tc, oc = cfg.train, cfg.optim
    ctx = ray.train.get_context()  # [ray]
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    _quiet_ray_train_logs()
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    torch.manual_seed(cfg.seed)

    model = build_model(cfg.model, spec, num_classes=len(labels))
    optimizer = build_optimizer(model.parameters(), oc.name, oc.lr, oc.weight_decay, oc.momentum)
    steps_per_epoch = max(1, math.ceil(config["train_rows"] / (tc.batch_size * world)))
    scheduler = build_scheduler(optimizer, oc.scheduler, steps_per_epoch * tc.epochs,
                                warmup_steps=int(oc.warmup_epochs * steps_per_epoch))
    state = LoopState()
    ckpt = ray.train.get_checkpoint()  # [ray] set after a worker failure or when a run with this name is re-run
    if ckpt is not None:
        with ckpt.as_directory() as d:
            model_state, optim_state, state = load_checkpoint(Path(d))
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state["optimizer"])
        scheduler.load_state_dict(optim_state["scheduler"])
        log.info("resuming from the checkpoint of epoch %d", state.epoch)
    start = state.epoch + 1
    state.starts.append(start)

    model = ray.train.torch.prepare_model(model)  # [ray] DDP + device placement
    device = ray.train.torch.get_device()  # [ray]
    train_shard = ray.train.get_dataset_shard("train")  # [ray]
    val_shard = ray.train.get_dataset_shard("val")  # [ray]
    for epoch in range(start, tc.epochs):
        if state.stopped_early:
            break
        tr = train_one_epoch(model, iter_torch_batches(train_shard, tc.batch_size, shuffle_seed=cfg.seed + epoch),
                             optimizer, scheduler, device, tc.precision, oc.grad_clip)
        va = evaluate(model, iter_torch_batches(val_shard, tc.batch_size), device, tc.precision)
        metrics = {"epoch": epoch, "train_loss": tr.loss, "train_accuracy": tr.accuracy, "val_loss": va.loss,
                   "val_accuracy": va.accuracy, "lr": scheduler.get_last_lr()[0],
                   "samples_per_s": tr.samples_per_s, "world_size": world}
        value = metrics.get(tc.metric)
        if value is None:
            raise ValueError(f"train.metric {tc.metric!r} is not reported; choose one of {sorted(metrics)}")
        if state.improved(value, tc.mode):
            state.best_metric, state.best_epoch, state.bad_epochs = value, epoch, 0
        else:
            state.bad_epochs += 1
        state.epoch = epoch
        state.history.append(metrics)
        state.stopped_early = bool(tc.early_stopping_patience and state.bad_epochs >= tc.early_stopping_patience)
        log.info("epoch %d/%d  train loss %.4f acc %.4f | val loss %.4f acc %.4f | %.0f samples/s%s",
                 epoch + 1, tc.epochs, tr.loss, tr.accuracy, va.loss, va.accuracy, tr.samples_per_s,
                 "  (early stop)" if state.stopped_early else "")
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                save_checkpoint(Path(d), unwrap(model).state_dict(),
                                {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, state)
                checkpoint = ray.train.Checkpoint.from_directory(d)  # [ray]
            ray.train.report(metrics, checkpoint=checkpoint)  # [ray] every rank reports
    return {"epoch": state.epoch, "starts": state.starts}
