"""Training checkpoints: weights (safetensors), optimizer/scheduler state (tensor-only, loaded with
weights_only=True) and the loop's progress (JSON). Nothing is unpickled on load."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

MODEL, OPTIM, STATE = "model.safetensors", "optim.pt", "state.json"


@dataclass
class LoopState:
    """What the loop needs to continue where it stopped."""

    epoch: int = -1  # last finished epoch (-1: none yet)
    best_metric: float | None = None
    best_epoch: int = -1
    bad_epochs: int = 0  # epochs since the best one (early stopping)
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per finished epoch
    starts: list[int] = field(default_factory=list)  # the epoch each (re)start began at: [0] or [0, 3, ...]
    stopped_early: bool = False
    majority_share: float | None = None  # accuracy of always predicting the largest train class
    learned: bool | None = None  # did any epoch's train accuracy beat majority_share (loop.beats_majority)?

    def improved(self, value: float, mode: str) -> bool:
        if self.best_metric is None:
            return True
        return value > self.best_metric if mode == "max" else value < self.best_metric


def save_checkpoint(d: Path, model_state: dict[str, torch.Tensor], optim_state: dict[str, Any],
                    state: LoopState) -> None:
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model_state.items()}, str(d / MODEL))
    torch.save(optim_state, d / OPTIM)
    (d / STATE).write_text(json.dumps(asdict(state), indent=1))


def load_checkpoint(d: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], LoopState]:
    model_state = load_file(str(d / MODEL))
    optim_state = torch.load(d / OPTIM, map_location="cpu", weights_only=True)
    state = LoopState(**json.loads((d / STATE).read_text()))
    return model_state, optim_state, state


def resume(d: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
           scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler | None,
           place: Callable[[torch.nn.Module], torch.nn.Module]) -> tuple[torch.nn.Module, LoopState]:
    """Restore a run from checkpoint folder `d`; returns (the placed model, the loop state).

    The order matters on a GPU: weights load into the CPU model, `place` moves it (Ray Train's prepare_model:
    device + DDP), and only then does the optimizer load its state, which `Optimizer.load_state_dict` casts
    to the device of the parameters it belongs to. Loaded before the move, AdamW's moments would stay on the
    CPU while the parameters live on the GPU, and the first step would fail.
    """
    model_state, optim_state, state = load_checkpoint(d)
    model.load_state_dict(model_state)
    model = place(model)
    optimizer.load_state_dict(optim_state["optimizer"])
    scheduler.load_state_dict(optim_state["scheduler"])
    if scaler is not None and scaler.is_enabled() and optim_state.get("scaler"):
        scaler.load_state_dict(optim_state["scaler"])  # fp16: carry on with the scale it had reached
    return model, state


def load_loop_state(d: Path) -> LoopState:
    return LoopState(**json.loads((d / STATE).read_text()))


def load_model_state(d: Path) -> dict[str, torch.Tensor]:
    return load_file(str(d / MODEL))
