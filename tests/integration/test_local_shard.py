"""Worker-local shards of materialized splits (data/local_shard.py): after the first epoch, a rank trains on
its own in-memory copy. It must hand out exactly the rows Ray Data streamed, collated alike, reshuffled per
seed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmfusion.config import load_config
from mmfusion.data.local_shard import LocalShard
from mmfusion.data.pipeline import build_datasets, iter_torch_batches
from mmfusion.train.trainer import keep_local_shards

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
KEYS = ("label", "text", "image", "audio", "present")


def rows(batches) -> list[bytes]:  # noqa: ANN001
    """Each row's tensors as one bytes key, in the order the batches gave them."""
    out = []
    for b in batches:
        assert set(KEYS) <= set(b) and b["image"].dtype == torch.float32  # the collate step ran (normalized)
        out += [b"".join(b[k][i].numpy().tobytes() for k in KEYS) for i in range(len(b["label"]))]
    return out


@pytest.fixture(scope="module")
def bundle(ray_local, avt_tiny: Path):
    cfg = load_config(REPO / "jobs" / "configs" / "avt_digits.yaml", [f"data.path={avt_tiny}"]).data
    return build_datasets(cfg, splits=("train", "val"))


def test_later_epochs_from_memory_hold_the_streamed_rows_in_a_new_order_per_seed(bundle):
    cpu = torch.device("cpu")
    streamed = rows(iter_torch_batches(bundle.train, 16, bundle.spec, shuffle_seed=1))
    local = LocalShard(bundle.train.iterator(), bundle.spec, cpu)
    first = rows(local.batches(16, shuffle_seed=1))  # streamed from Ray Data, kept
    assert local.rows == bundle.train_rows and local.nbytes > 0
    again, other = rows(local.batches(16, shuffle_seed=1)), rows(local.batches(16, shuffle_seed=2))
    assert sorted(first) == sorted(streamed) == sorted(again) == sorted(other)  # the same rows, once each
    assert len(set(first)) == bundle.train_rows
    assert again == rows(local.batches(16, shuffle_seed=1))  # a seed fixes the order
    assert again != other  # another seed, another order
    sizes = [len(b["label"]) for b in local.batches(16, shuffle_seed=3)]
    assert sizes[:-1] == [16] * (len(sizes) - 1) and 0 < sizes[-1] <= 16


def test_unshuffled_split_keeps_its_order(bundle):
    local = LocalShard(bundle.val.iterator(), bundle.spec, torch.device("cpu"))
    first, second = rows(local.batches(8)), rows(local.batches(8))
    assert first == second  # the first pass's order, kept
    assert sorted(first) == sorted(rows(iter_torch_batches(bundle.val, 8, bundle.spec)))
    assert len(first) == bundle.val_rows


def test_only_materialized_splits_are_copied_to_workers(bundle):
    assert keep_local_shards({"train": bundle.train, "val": bundle.val})
    assert not keep_local_shards({"train": bundle.train.random_shuffle(), "val": bundle.val})  # streams
