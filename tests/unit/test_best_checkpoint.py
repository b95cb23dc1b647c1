"""Which checkpoint becomes the artifact, and that metrics.json names that checkpoint's epoch."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from ray.train import Checkpoint

from mmfusion.train.checkpoint import LoopState, load_loop_state, save_checkpoint
from mmfusion.train.trainer import _best_checkpoint


def checkpoint(tmp_path: Path, epoch: int, history: list[dict]) -> Checkpoint:
    d = tmp_path / f"epoch{epoch}"
    save_checkpoint(d, {"w": torch.full((1,), float(epoch))}, {}, LoopState(epoch=epoch, history=history))
    return Checkpoint.from_directory(str(d))


@pytest.mark.parametrize("mode,values,want", [
    ("max", [0.15, 0.30, 0.15, 0.30], 1),  # a tie: the earliest of the best, as the loop counts it
    ("min", [0.9, 0.4, 0.4, 0.7], 1),
    ("max", [0.1, 0.2, 0.3, 0.3], 2),
])
def test_best_of_the_kept_checkpoints_earliest_on_a_tie(tmp_path, mode, values, want):
    history = [{"epoch": e, "val_metric": v} for e, v in enumerate(values)]
    kept = [(checkpoint(tmp_path, e, history[:e + 1]), history[e]) for e in range(len(values))]
    result = SimpleNamespace(best_checkpoints=kept[::-1])  # Ray's order is not the epochs' order
    best = _best_checkpoint(result, "val_metric", mode)
    with best.as_directory() as d:
        assert load_loop_state(Path(d)).epoch == want


def test_pruned_first_best_leaves_the_kept_one(tmp_path):
    """checkpoints_to_keep pruned epoch 0 (0.15); epoch 4 ties it and is what the artifact gets."""
    history = [{"epoch": e, "val_metric": v} for e, v in enumerate([0.15, 0.1, 0.1, 0.12, 0.15])]
    kept = [(checkpoint(tmp_path, e, history[:e + 1]), history[e]) for e in (3, 4)]
    best = _best_checkpoint(SimpleNamespace(best_checkpoints=kept), "val_metric", "max")
    with best.as_directory() as d:
        assert load_loop_state(Path(d)).epoch == 4
    assert _best_checkpoint(SimpleNamespace(best_checkpoints=[]), "val_metric", "max") is None
