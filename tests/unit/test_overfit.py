"""A real learning check: a tiny model of each fusion operator memorizes a fixed AVT-Digits batch.

The batch goes through the same non-Ray path as serving (records -> Preprocessor -> collated tensors) and
includes the rows of the tiny build that lack a modality. Each fusion must go from chance to 100% training
accuracy within a few hundred Adam steps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmfusion.config import ExperimentConfig, load_config
from mmfusion.models.model import FUSIONS, build_model

ROWS = 48
MAX_STEPS = 300
TINY = [
    "model.encoders.image={name: cnn, channels: [8, 16], dim: 32, dropout: 0.0}",
    "model.encoders.text={name: lstm, embed_dim: 16, hidden: 32, dim: 32, dropout: 0.0}",
    "model.encoders.audio={name: cnn, channels: [8, 16], dim: 32, dropout: 0.0}",
    "model.fusion.dim=32",
    "model.fusion.hidden=64",
    "model.fusion.tensor_dim=8",
    "model.fusion.dropout=0.0",
    "model.modality_dropout={}",
]


def tiny_config(repo_root: Path, data: Path, *overrides: str) -> ExperimentConfig:
    return load_config(repo_root / "jobs" / "configs" / "avt_digits.yaml",
                       [f"data.path={data}", *TINY, *overrides])


@pytest.fixture(scope="module")
def fixed_batch(avt_tiny: Path, repo_root: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    from mmfusion.data.labels import sort_labels
    from mmfusion.data.preprocessor import Preprocessor
    from mmfusion.data.readers import read_records

    cfg = tiny_config(repo_root, avt_tiny)
    table = read_records(str(avt_tiny), split="train")
    labels = sort_labels(str(v) for v in table["label"].to_pylist())
    missing = np.zeros(table.num_rows, dtype=bool)
    for m in cfg.data.modalities:
        missing |= table[m].is_null().to_numpy(zero_copy_only=False)
    # rows lacking a modality first
    order = np.concatenate([np.flatnonzero(missing), np.flatnonzero(~missing)])[:ROWS]
    out = Preprocessor(cfg.data, labels)(table.take(order).to_pydict())
    assert not any(out["error"]), [e for e in out["error"] if e]
    batch = {k: torch.from_numpy(np.asarray(out[k]))
             for k in ("image", "text", "text_mask", "audio", "present", "label")}
    assert batch["label"].unique().numel() == len(labels) == 10
    return batch, labels


@pytest.mark.parametrize("fusion", list(FUSIONS))
def test_fusion_overfits_a_fixed_batch(fixed_batch: tuple[dict[str, torch.Tensor], list[str]], avt_tiny: Path,
                                       repo_root: Path, fusion: str) -> None:
    batch, labels = fixed_batch
    cfg = tiny_config(repo_root, avt_tiny, f"model.fusion.name={fusion}")
    from mmfusion.data.preprocessor import input_spec

    torch.manual_seed(0)
    model = build_model(cfg.model, input_spec(cfg.data), num_classes=len(labels))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    def accuracy() -> float:
        model.eval()
        with torch.no_grad():
            return (model(batch).argmax(dim=1) == batch["label"]).float().mean().item()

    start = accuracy()
    acc, step = start, 0
    while acc < 1.0 and step < MAX_STEPS:
        model.train()
        for _ in range(10):
            loss = F.cross_entropy(model(batch), batch["label"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        step += 10
        acc = accuracy()
    assert start < 0.5, f"{fusion}: {start:.0%} before training: the check would not show learning"
    assert acc == 1.0, f"{fusion}: training accuracy {acc:.0%} after {step} steps"
