"""The pure-PyTorch part of training: optimizer, schedule, one epoch, evaluation. No Ray here.

Batches are dicts keyed by modality (see mmfusion.batch); the loop never looks inside them except for
"label". Distributed reduction is done with torch.distributed when it is initialized (DDP under Ray Train).

A run cannot fail silently: a non-finite training loss raises TrainingDivergedError naming the epoch and the
step, and `beats_majority` tells whether the train accuracy ever beat always predicting the largest class.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from mmfusion.errors import TrainingDivergedError
from mmfusion.evaluate.metrics import balanced_accuracy, macro_f1

log = logging.getLogger(__name__)

LEARN_MARGIN = 0.02  # train accuracy must beat the majority-class share by this much to count as learning


def param_groups(model: nn.Module, lr: float, weight_decay: float,
                 encoder_lr: float | dict[str, float] | None = None) -> list[dict]:
    """Optimizer parameter groups: encoders at `encoder_lr` (per modality when a dict), the rest at `lr`.

    An encoder's `new_parameters()`, when it has them (the projection a pretrained encoder adds on top of its
    backbone: mmfusion.models.encoders.FrozenBackboneMixin), are randomly initialised layers like the head's:
    they train at `lr`, and `encoder_lr` applies to the backbone only. Encoders without that method (the
    from-scratch CNN, LSTM, Transformer) train wholly at `encoder_lr`.
    Biases and normalization weights (1-D parameters) get no weight decay, as usual: decaying a BatchNorm or
    LayerNorm scale towards 0 only fights the normalization. Frozen parameters are left out.
    """
    encoders = getattr(getattr(model, "module", model), "encoders", None)  # DDP wraps the FusionModel
    new = {id(p) for enc in (encoders.values() if isinstance(encoders, nn.ModuleDict) else ())
           for p in (enc.new_parameters() if hasattr(enc, "new_parameters") else ())}
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        parts = name.removeprefix("module.").split(".")
        group_lr = lr
        if parts[0] == "encoders" and encoder_lr is not None and id(p) not in new:  # encoders.<modality>.*
            group_lr = encoder_lr.get(parts[1], lr) if isinstance(encoder_lr, dict) else encoder_lr
        groups.setdefault((group_lr, 0.0 if p.ndim <= 1 else weight_decay), []).append(p)
    return [{"params": ps, "lr": g_lr, "weight_decay": wd} for (g_lr, wd), ps in groups.items()]


def build_optimizer(params: Iterable[nn.Parameter] | list[dict], name: str, lr: float, weight_decay: float,
                    momentum: float = 0.9) -> torch.optim.Optimizer:
    """AdamW or SGD over parameters or parameter groups (`param_groups`); frozen parameters are dropped."""
    params = list(params)
    if params and isinstance(params[0], dict):
        params = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in params]
    else:
        params = [p for p in params if p.requires_grad]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=True)
    raise ValueError(f"unknown optimizer {name!r}; known: adamw, sgd")


# ------------------------------------------------------------------------------- loss and imbalance


def class_weights(counts: list[int], mode: str) -> Tensor | None:
    """(K,) cross-entropy class weights from the train split's class counts; None for mode "none".

    "balanced": n_samples / (n_classes * count_c), so every class carries the same total weight and the
    weights average 1 over the rows. n_classes counts the classes that have train rows; a class without any
    gets weight 0 (it never appears as a target anyway).
    """
    if mode == "none":
        return None
    if mode != "balanced":
        raise ValueError(f"unknown class_weights {mode!r}; known: none, balanced")
    c = torch.tensor(counts, dtype=torch.float32)  # (K,)
    if c.numel() == 0 or float(c.sum()) == 0:
        raise ValueError("class_weights=balanced needs the train split's class counts")
    present = int((c > 0).sum())
    return torch.where(c > 0, c.sum() / (present * c.clamp_min(1)), torch.zeros_like(c))


def classification_loss(logits: Tensor, labels: Tensor, weight: Tensor | None = None,
                        label_smoothing: float = 0.0) -> Tensor:
    """Mean cross-entropy of (B, K) logits against (B,) labels; with `weight` the mean is weighted
    (sum_i w[y_i] * loss_i / sum_i w[y_i]), as in `F.cross_entropy`."""
    return F.cross_entropy(logits.float(), labels, weight=weight, label_smoothing=label_smoothing)


def majority_share(counts: list[int]) -> float:
    """The accuracy of always predicting the largest class."""
    total = sum(counts)
    return max(counts) / total if total else 0.0


def beats_majority(train_accuracies: list[float], share: float, margin: float = LEARN_MARGIN) -> bool:
    """Whether any epoch's train accuracy beat the majority-class share by `margin` (a constant predictor
    scores about `share`; one that learned anything scores clearly above it)."""
    return any(a > share + margin for a in train_accuracies)


def _confusion(labels: Tensor, preds: Tensor, k: int) -> Tensor:  # (B,), (B,) -> (K, K) int64
    return torch.bincount(labels.long() * k + preds.long(), minlength=k * k)[: k * k].view(k, k)


def _bad_inputs(batch: dict[str, Tensor]) -> list[str]:
    return [k for k, v in batch.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, total_steps: int,
                    warmup_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step LR multiplier: linear warmup, then cosine decay to 0 (or constant)."""
    total_steps = max(1, total_steps)

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if name == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on GPU when precision is auto/bf16, fp16 autocast when fp16; on CPU only when asked for
    explicitly."""
    if precision == "fp16":
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A loss scaler, enabled for fp16 only: float16 gradients underflow without it. bf16 has fp32's
    exponent range and needs none; a disabled scaler passes every call through."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    samples: int
    seconds: float
    confusion: np.ndarray | None = None  # (K, K) counts, rows = true class; None without num_classes
    first_step_at: float | None = None  # wall clock (time.time()) when the first batch arrived
    data_wait_s: float = 0.0  # time blocked in next() on the batch iterator (training waiting on data)
    data_first_wait_s: float = 0.0  # of which the first batch's (the pipeline's start-up each epoch)

    @property
    def samples_per_s(self) -> float:
        return self.samples / max(self.seconds, 1e-9)

    @property
    def macro_f1(self) -> float:
        return macro_f1(self.confusion) if self.confusion is not None else float("nan")

    @property
    def balanced_accuracy(self) -> float:
        return balanced_accuracy(self.confusion) if self.confusion is not None else float("nan")


def _reduce(loss_sum: float, correct: int, count: int, cm: Tensor | None, device: torch.device,
            ) -> tuple[float, int, int, np.ndarray | None]:
    """Sum the counters (and the confusion matrix) over all ranks (identity when not distributed)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        extra = cm.to(device, torch.float64).flatten() if cm is not None else torch.zeros(0, device=device)
        t = torch.cat([torch.tensor([loss_sum, float(correct), float(count)], dtype=torch.float64,
                                    device=device), extra.to(torch.float64)])
        dist.all_reduce(t)
        cm = t[3:].round().long().view(cm.shape) if cm is not None else None
        loss_sum, correct, count = float(t[0]), int(t[1]), int(t[2])
    return loss_sum, correct, count, (cm.cpu().numpy() if cm is not None else None)


def train_one_epoch(model: nn.Module, batches: Iterable[dict[str, Tensor]], optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None, device: torch.device,
                    precision: str = "auto", grad_clip: float | None = None, log_every: int = 0, *,
                    epoch: int = 0, class_weight: Tensor | None = None, label_smoothing: float = 0.0,
                    num_classes: int | None = None, scaler: torch.amp.GradScaler | None = None,
                    on_step: Callable[[int, float], None] | None = None) -> EpochStats:
    """One pass over `batches`. `epoch` (0-based) only names the epoch in errors. `scaler` (fp16): the
    caller's GradScaler, so its scale carries over epochs and into checkpoints; made here when None.
    `on_step(step, loss)`: called after each optimizer step (step 0-based within the epoch, this rank's loss).

    Raises:
        TrainingDivergedError: the loss is NaN or infinite (raised before the step would spread it to the
            weights).
    """
    model.train()
    scaler = scaler if scaler is not None else grad_scaler(device, precision)
    weight = class_weight.to(device) if class_weight is not None else None
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device) if num_classes else None
    loss_sum, correct, count, t0, first = 0.0, 0, 0, time.perf_counter(), None
    waits = _WaitClock(batches)
    for step, batch in enumerate(waits):
        first = first or time.time()
        batch = to_device(batch, device)
        labels = batch["label"]  # (B,)
        with autocast_context(device, precision):
            logits = model(batch)  # (B, K)
            loss = classification_loss(logits, labels, weight, label_smoothing)
        value = float(loss.detach())  # one sync per step, which the running loss needs anyway
        if not math.isfinite(value):
            bad = _bad_inputs(batch)
            raise TrainingDivergedError(
                f"the training loss became {value} at epoch {epoch + 1}, step {step + 1} (batch of "
                f"{labels.shape[0]} rows); " + (f"the batch has non-finite values in {', '.join(bad)}: check "
                                                 "the data and its preprocessing" if bad else
                                                 "the model diverged: lower optim.lr, keep optim.grad_clip, "
                                                 "or try train.precision=fp32"))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # fp16: the loss times the scale, so small gradients stay representable
        if grad_clip:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)  # skips the step when a gradient overflowed (and lowers the scale)
        scaler.update()
        if scheduler is not None:
            scheduler.step()
        if on_step is not None:
            on_step(step, value)
        n = labels.shape[0]
        preds = logits.detach().argmax(-1)  # (B,)
        loss_sum += value * n
        correct += int((preds == labels).sum())
        count += n
        if cm is not None:
            cm += _confusion(labels, preds, cm.shape[0])
        if log_every and step % log_every == 0:
            log.info("  step %d loss %.4f", step, value)
    loss_sum, correct, count, cm_np = _reduce(loss_sum, correct, count, cm, device)
    return EpochStats(loss_sum / max(count, 1), correct / max(count, 1), count, time.perf_counter() - t0,
                      cm_np, first, data_wait_s=waits.seconds, data_first_wait_s=waits.first)


class _WaitClock:
    """Iterates `batches` and adds up the time each next() blocks: how long training waits on data."""

    def __init__(self, batches: Iterable[dict[str, Tensor]]) -> None:
        self._it = iter(batches)
        self.seconds = 0.0  # all next() calls
        self.first = 0.0  # the first one
        self.calls = 0

    def __iter__(self) -> _WaitClock:
        return self

    def __next__(self) -> dict[str, Tensor]:
        t = time.perf_counter()
        try:
            return next(self._it)
        finally:
            dt = time.perf_counter() - t
            self.first = dt if self.calls == 0 else self.first
            self.seconds += dt
            self.calls += 1


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[dict[str, Tensor]], device: torch.device,
             precision: str = "auto", num_classes: int | None = None) -> EpochStats:
    """Plain (unweighted, unsmoothed) cross-entropy and accuracy; macro-F1 too when num_classes is given."""
    model.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device) if num_classes else None
    loss_sum, correct, count, t0 = 0.0, 0, 0, time.perf_counter()
    for batch in batches:
        batch = to_device(batch, device)
        with autocast_context(device, precision):
            logits = model(batch).float()  # (B, K)
        labels = batch["label"]  # (B,)
        preds = logits.argmax(-1)
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += int((preds == labels).sum())
        count += labels.shape[0]
        if cm is not None:
            cm += _confusion(labels, preds, cm.shape[0])
    loss_sum, correct, count, cm_np = _reduce(loss_sum, correct, count, cm, device)
    return EpochStats(loss_sum / max(count, 1), correct / max(count, 1), count, time.perf_counter() - t0,
                      cm_np)


@torch.no_grad()
def predict_proba(model: nn.Module, batches: Iterable[dict[str, Tensor]], device: torch.device,
                  precision: str = "fp32") -> tuple[Tensor, Tensor | None]:
    """Class probabilities (N, K) and labels (N,) if the batches carry them. Single process."""
    model.eval()
    probs, labels = [], []
    for batch in batches:
        batch = to_device(batch, device)
        with autocast_context(device, precision):
            logits = model(batch).float()
        probs.append(torch.softmax(logits, dim=-1).cpu())
        if "label" in batch:
            labels.append(batch["label"].cpu())
    p = torch.cat(probs) if probs else torch.empty(0, 0)
    return p, (torch.cat(labels) if labels else None)
