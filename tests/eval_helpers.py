"""Helpers for the predict / evaluate / robustness tests: a copy of a split with undecodable and empty rows,
and a tiny fusion model trained in-process (no Ray, seconds) on the tiny AVT-Digits build, saved as an
artifact, for tests whose numbers need a model that learned something (a random one sits at chance)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from tests.helpers import tiny_config

from mmfusion.artifact import save_artifact
from mmfusion.batch import input_keys
from mmfusion.data.labels import sort_labels
from mmfusion.data.preprocessor import Preprocessor, input_spec
from mmfusion.data.readers import read_records
from mmfusion.models.model import build_model

BAD_ROWS = {"bad-image": ("image", b"not an image"), "bad-audio": ("audio", b"RIFF\x00\x00 not a wav")}
EMPTY_ROW_ID = "no-modality"


def with_bad_rows(data: Path, out: Path, split: str = "test", labelled: bool = True) -> Path:
    """`split` of `data` as out/<split>.parquet plus one row per BAD_ROWS entry (that modality's bytes are
    garbage) and one row with no modality at all; without the label column unless `labelled`."""
    tb = pq.read_table(next(data.glob(f"{split}*.parquet")))
    extra = tb.slice(0, len(BAD_ROWS) + 1).to_pylist()
    for row, (rid, (modality, junk)) in zip(extra, BAD_ROWS.items(), strict=False):
        row.update({"id": rid, modality: junk})
    extra[-1].update({"id": EMPTY_ROW_ID, "image": None, "text": None, "audio": None})
    tb = pa.concat_tables([tb, pa.Table.from_pylist(extra, schema=tb.schema)])
    if not labelled:
        tb = tb.drop_columns(["label"])
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(tb, out / f"{split}.parquet")
    return out


def train_tiny_artifact(data: Path, out: Path, steps: int = 150, batch: int = 50, seed: int = 0) -> Path:
    """Adam on the train split (with the config's modality dropout), `steps` minibatches, fixed seed."""
    cfg = tiny_config(data, out.parent / "runs", f"seed={seed}")
    table = read_records(str(data), "train")
    labels = sort_labels(str(v) for v in table["label"].to_pylist())
    rows = Preprocessor(cfg.data, labels)(table.to_pydict())
    good = np.asarray(rows["error"]) == ""
    keys = (*input_keys(cfg.data.modalities), "label")
    tensors = {k: torch.from_numpy(np.ascontiguousarray(np.asarray(rows[k])[good])) for k in keys}
    torch.manual_seed(seed)
    model = build_model(cfg.model, input_spec(cfg.data), num_classes=len(labels))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    n = int(good.sum())
    model.train()
    for _ in range(steps):
        idx = torch.randperm(n, generator=gen)[:batch]
        loss = F.cross_entropy(model({k: v[idx] for k, v in tensors.items()}), tensors["label"][idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return save_artifact(out, model.state_dict(), cfg, labels, {})
