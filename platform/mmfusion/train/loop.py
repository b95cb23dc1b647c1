"""The pure-PyTorch part of training: optimizer, schedule, one epoch, evaluation. No Ray here.

Batches are dicts keyed by modality (see mmfusion.models.spec); the loop never looks inside them except for
"label". Distributed reduction is done with torch.distributed when it is initialized (DDP under Ray Train).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

log = logging.getLogger(__name__)


def build_optimizer(params: Iterable[nn.Parameter], name: str, lr: float, weight_decay: float,
                    momentum: float = 0.9) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=True)
    raise ValueError(f"unknown optimizer {name!r}; known: adamw, sgd")


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
    """bf16 autocast on GPU when precision is auto/bf16; on CPU only when asked for explicitly."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    samples: int
    seconds: float

    @property
    def samples_per_s(self) -> float:
        return self.samples / max(self.seconds, 1e-9)


def _reduce(loss_sum: float, correct: int, count: int, device: torch.device) -> tuple[float, int, int]:
    """Sum the three counters over all ranks (identity when not distributed)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([loss_sum, float(correct), float(count)], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return float(t[0]), int(t[1]), int(t[2])
    return loss_sum, correct, count


def train_one_epoch(model: nn.Module, batches: Iterable[dict[str, Tensor]], optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None, device: torch.device,
                    precision: str = "auto", grad_clip: float | None = None,
                    log_every: int = 0) -> EpochStats:
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    loss_sum, correct, count, t0 = 0.0, 0, 0, time.perf_counter()
    for step, batch in enumerate(batches):
        batch = to_device(batch, device)
        labels = batch["label"]  # (B,)
        with autocast_context(device, precision):
            logits = model(batch)  # (B, K)
            loss = loss_fn(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        n = labels.shape[0]
        loss_sum += float(loss.detach()) * n
        correct += int((logits.argmax(-1) == labels).sum())
        count += n
        if log_every and step % log_every == 0:
            log.info("  step %d loss %.4f", step, float(loss.detach()))
    loss_sum, correct, count = _reduce(loss_sum, correct, count, device)
    return EpochStats(loss_sum / max(count, 1), correct / max(count, 1), count, time.perf_counter() - t0)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[dict[str, Tensor]], device: torch.device,
             precision: str = "auto") -> EpochStats:
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    loss_sum, correct, count, t0 = 0.0, 0, 0, time.perf_counter()
    for batch in batches:
        batch = to_device(batch, device)
        with autocast_context(device, precision):
            logits = model(batch).float()  # (B, K)
        loss_sum += float(loss_fn(logits, batch["label"]))
        correct += int((logits.argmax(-1) == batch["label"]).sum())
        count += batch["label"].shape[0]
    loss_sum, correct, count = _reduce(loss_sum, correct, count, device)
    return EpochStats(loss_sum / max(count, 1), correct / max(count, 1), count, time.perf_counter() - t0)


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
