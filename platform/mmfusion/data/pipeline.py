"""The Ray Data pipeline: records -> preprocessed, validated train/val(/test) datasets -> collated torch
batches.

    summarize (driver: columns, rows per split, labels)
      -> from_items(read units).map_batches(read + load media, TaskPoolStrategy)        # readers.py
      -> map_batches(Preprocessor, ActorPoolStrategy, batch_format="numpy")             # preprocessor.py
      -> materialize once: rejects counted and written, max_bad_fraction enforced
      -> (training) audio feature mean/std measured on the train split, stored in cfg.audio.stats, applied
      -> per-split datasets (val carved out of train by a seeded id hash when the data has none)
    MMCollate turns numpy batches into the torch batch contract of mmfusion.batch.

The datasets are materialized after preprocessing: every epoch then reads decoded tensors instead of decoding
again, and the bad-row fraction is known before training starts.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data
import torch
from ray.data import ActorPoolStrategy, TaskPoolStrategy
from ray.data.collate_fn import NumpyBatchCollateFn
from ray.data.expressions import col

from mmfusion.batch import DTYPES, InputSpec, input_keys
from mmfusion.config import AudioStats, DataConfig
from mmfusion.data import readers, rejects, schema
from mmfusion.data.audio import fit_stats, standardize
from mmfusion.data.preprocessor import EMPTY_ROW, META_COLUMNS, Preprocessor, input_spec
from mmfusion.data.text import load_tokenizer
from mmfusion.errors import DataError

log = logging.getLogger(__name__)

PREPROCESS_BATCH = 128  # rows per Preprocessor call: amortizes the vectorised torch work
READ_CPUS = 0.5  # per read task (I/O-bound) when reads run apart from the Preprocessor actors
PREPROCESS_BLOCK = 512  # rows per block handed to a Preprocessor actor
ROWS_PER_ACTOR = 4096  # one more actor per this many rows: an actor costs seconds to start (torch imports)
MANIFEST_UNIT_ROWS = 1024  # JSONL/CSV records per read task (each loads the media files its rows name)


@dataclass
class DatasetBundle:
    train: ray.data.Dataset | None  # None when "train" was not requested
    val: ray.data.Dataset | None  # None when "val" was not requested
    test: ray.data.Dataset | None  # None when "test" was not requested
    labels: list[str]  # class names; "label" values index into this list
    spec: InputSpec
    num_rejected: int  # rows set aside (undecodable), over the requested splits
    num_rows: int  # rows read over the requested splits, rejected ones included
    rejects_path: Path | None  # the rejects file, None when nothing was rejected
    train_rows: int = 0  # rows in each dataset (0 when not requested)
    val_rows: int = 0
    test_rows: int = 0
    class_counts: list[int] = field(default_factory=list)  # train rows per label index; [] without train


def build_datasets(cfg: DataConfig, splits: tuple[str, ...] = ("train", "val"), seed: int = 0,
                   labels: list[str] | None = None) -> DatasetBundle:
    """Read, decode and preprocess the dataset at cfg.path into Ray Datasets of model-ready rows.

    Args:
        cfg: the data section of the experiment config.
        splits: which of "train", "val", "test" to build. A missing val split is carved out of train
            (cfg.val_fraction of it, chosen by a hash of the row id and `seed`, so it is stable across runs).
        seed: the experiment seed (val carve-out only).
        labels: class names to index labels with (an artifact's labels at evaluation time); default: the
            sorted unique labels of the train split.
    Training (labels not given, "train" requested): when audio is configured with data.audio.normalize and
    without data.audio.stats, the mean/std of the train split's features are measured here, written into
    `cfg.audio.stats` (so the experiment config saved in the artifact carries them) and applied to every
    split. With stats already set (an artifact's config), the Preprocessor applies them directly.
    Returns:
        A DatasetBundle; each dataset has the columns of the batch contract (mmfusion.batch).
    Raises:
        DataError: missing data, a configured modality absent from the data, or too many undecodable rows.
    """
    fit_audio = (labels is None and "train" in splits and "audio" in cfg.modalities
                 and cfg.audio.normalize != "none" and cfg.audio.stats is None)
    unknown = set(splits) - set(schema.SPLITS)
    if unknown or not splits:
        raise DataError(f"splits must be a non-empty subset of {schema.SPLITS}, got {splits}")
    summary = readers.summarize(cfg.path, cfg.label_column)
    absent = [m for m in cfg.modalities if m not in summary.columns]
    if absent:
        raise DataError(
            f"data.modalities includes {', '.join(repr(m) for m in absent)} but the dataset {cfg.path} has "
            f"no {' or '.join(absent)} column "
            f"(columns found: {', '.join(sorted(summary.columns)) or 'none'})"
        )
    if "label" not in summary.columns:
        raise DataError(f"the dataset {cfg.path} has no {cfg.label_column!r} column (data.label_column)")
    labels = list(labels) if labels is not None else summary.labels
    if not labels:
        raise DataError(f"the dataset {cfg.path} has no labelled rows in its train split")
    found = ", ".join(f"{s} {n}" for s, n in summary.rows.items()) or "no rows"
    carve_val = "val" in splits and summary.rows.get("val", 0) == 0
    for s in splits:
        if summary.rows.get(s, 0) == 0 and not (s == "val" and carve_val):
            raise DataError(f"the dataset {cfg.path} has no {s!r} rows (found: {found})")
    if carve_val and summary.rows.get("train", 0) == 0:
        raise DataError(f"the dataset {cfg.path} has neither val nor train rows to take val from "
                        f"(found: {found})")
    read_splits = sorted(set(splits) | ({"train"} if carve_val else set()))
    tokenizer = load_tokenizer(cfg.text) if "text" in cfg.modalities else None
    spec = input_spec(cfg, tokenizer)  # fails fast on a bad preprocessing config, before any actor starts

    processed = _preprocessed(cfg, summary, read_splits, labels).materialize()
    num_rows = processed.count()
    bad_rows = processed.filter(expr=col("error") != "").select_columns([*META_COLUMNS, "error"])
    bad = bad_rows.take_all()
    empty = [r for r in bad if str(r["error"]).startswith(EMPTY_ROW)]  # fine rows, just not for this model
    bad = [r for r in bad if not str(r["error"]).startswith(EMPTY_ROW)]
    rejects_path = _write_rejects(cfg, bad)
    log.info("read %d rows (%s) from %s; %d rejected", num_rows, ", ".join(read_splits), cfg.path, len(bad))
    if empty:
        log.info("%d rows have none of data.modalities %s and are skipped", len(empty), cfg.modalities)
    rejects.check_bad_fraction(len(bad), num_rows - len(empty), cfg.max_bad_fraction, rejects_path)

    good = processed.filter(expr=col("error") == "")
    if carve_val:
        threshold = _val_threshold(good, cfg.val_fraction, seed)
        log.info("no val split in %s: using %.0f%% of train as val (seed %d)", cfg.path,
                 100 * cfg.val_fraction, seed)
        good = good.map_batches(_carve_val, batch_format="pyarrow",
                                fn_kwargs={"seed": seed, "threshold": threshold})
    if fit_audio:
        good = _standardize_audio(good, cfg)
    drop = [c for c in (*META_COLUMNS, "error") if c in processed.columns()]

    out: dict[str, ray.data.Dataset | None] = {s: None for s in schema.SPLITS}
    for s in splits:  # materialized: epochs read tensors directly, and the unsplit blocks can be freed
        out[s] = good.filter(expr=col("split") == s).drop_columns(drop).materialize()
    rows = {s: (d.count() if d is not None else 0) for s, d in out.items()}
    if "val" in splits and rows["val"] == 0:
        log.warning("the val split of %s is empty", cfg.path)
    counts = _class_counts(out["train"], len(labels)) if out["train"] is not None else []
    return DatasetBundle(train=out["train"], val=out["val"], test=out["test"], labels=labels, spec=spec,
                         num_rejected=len(bad), num_rows=num_rows, rejects_path=rejects_path,
                         train_rows=rows["train"], val_rows=rows["val"], test_rows=rows["test"],
                         class_counts=counts)


def _standardize_audio(good: ray.data.Dataset, cfg: DataConfig) -> ray.data.Dataset:
    """Measure the audio feature mean/std over the train rows that have audio (a per-batch sum and sum of
    squares, added up on the driver), store them in cfg.audio.stats and standardize every split with them."""
    column = list(cfg.modalities).index("audio")
    parts = (good.filter(expr=col("split") == "train").select_columns(["audio", "present"])
             .map_batches(_audio_moments, batch_format="numpy", fn_kwargs={"column": column}).take_all())
    count = sum(int(p["count"]) for p in parts)
    if count == 0:
        log.warning("no train row of %s has audio: audio features are not standardized", cfg.path)
        return good
    sums = np.sum([p["sums"] for p in parts], axis=0)  # (F,) float64
    squares = np.sum([p["squares"] for p in parts], axis=0)
    cfg.audio.stats = fit_stats(count, sums, squares, cfg.audio.normalize)
    log.info("audio features standardized (%s) with the mean/std of %d train frames", cfg.audio.normalize,
             count)
    return good.map_batches(_apply_audio_stats, batch_format="numpy",
                            fn_kwargs={"stats": cfg.audio.stats, "column": column})


def _audio_moments(batch: dict[str, np.ndarray], column: int) -> dict[str, np.ndarray]:
    """Ray task: per-bin sums of x and x^2 over the frames of the batch's present clips. -> one row"""
    x = np.asarray(batch["audio"])[np.asarray(batch["present"])[:, column], 0].astype(np.float64)  # (k, F, T)
    return {"count": np.array([x.shape[0] * x.shape[2]]), "sums": x.sum(axis=(0, 2))[None],
            "squares": np.square(x).sum(axis=(0, 2))[None]}


def _apply_audio_stats(batch: dict[str, np.ndarray], stats: AudioStats, column: int) -> dict[str, np.ndarray]:
    batch["audio"] = standardize(np.asarray(batch["audio"]), np.asarray(batch["present"])[:, column], stats)
    return batch


def _class_counts(ds: ray.data.Dataset, num_classes: int) -> list[int]:
    """Rows per class index (K,) of a preprocessed split: class weights and the majority-class baseline."""
    counts = np.zeros(num_classes, dtype=np.int64)
    for b in ds.select_columns(["label"]).iter_batches(batch_size=65536, batch_format="numpy"):
        y = np.asarray(b["label"], dtype=np.int64)
        counts += np.bincount(y[y >= 0], minlength=num_classes)[:num_classes]  # -1: unlabelled
    return [int(c) for c in counts]


def _preprocessed(cfg: DataConfig, summary: readers.DatasetSummary, splits: list[str], labels: list[str],
                  ) -> ray.data.Dataset:
    units = [u.as_row() for u in readers.plan_units(summary.files, MANIFEST_UNIT_ROWS)]
    rows = sum(n for s, n in summary.rows.items() if s in splits)
    actors = min(_cluster_cpus(), max(1, math.ceil(rows / ROWS_PER_ACTOR)))
    read_kwargs: dict[str, Any] = {}
    if cfg.read_parallelism > 0:
        read_kwargs["compute"] = TaskPoolStrategy(size=cfg.read_parallelism)
    if actors > 1:
        # a resource request unlike the Preprocessor's keeps Ray from fusing reads into the actors, so the
        # blocks a read task streams out (cut to PREPROCESS_BLOCK rows) are spread over the whole actor pool
        read_kwargs["num_cpus"] = READ_CPUS
    ds = ray.data.from_items(units, override_num_blocks=len(units)).map_batches(
        _read_units, batch_size=1, batch_format="pyarrow",
        fn_kwargs={"label_column": cfg.label_column, "splits": splits, "modalities": list(cfg.modalities)},
        **read_kwargs,
    )
    if actors > 1:
        ds = ds.repartition(target_num_rows_per_block=PREPROCESS_BLOCK)  # streaming, no shuffle
    log.info("preprocessing %d rows with up to %d actor(s)", rows, actors)
    return ds.map_batches(
        Preprocessor,
        fn_constructor_kwargs={"cfg": cfg, "labels": labels, "num_threads": 1},
        batch_size=PREPROCESS_BATCH,
        batch_format="numpy",
        compute=ActorPoolStrategy(min_size=1, max_size=actors),
    )


def _read_units(batch: pa.Table, label_column: str, splits: list[str], modalities: list[str],
                ) -> Iterator[pa.Table]:
    """Ray task: read units (Parquet row groups / manifest slices) -> RECORD_SCHEMA tables with media
    loaded."""
    for row in batch.to_pylist():
        unit = readers.ReadUnit.from_row(row)
        for tb in readers.read_unit(unit, label_column, set(splits), modalities):
            if tb.num_rows:
                yield readers.resolve_media(tb)


def _cluster_cpus() -> int:
    if ray.is_initialized():
        return max(1, int(ray.cluster_resources().get("CPU", 1)))
    return max(1, os.cpu_count() or 1)


def _write_rejects(cfg: DataConfig, bad: list[dict[str, Any]]) -> Path | None:
    path = rejects.update_rejects(rejects.default_rejects_path(cfg.path, cfg.rejects_path), bad)
    if path is not None:
        log.warning("%d rejected rows written to %s", len(bad), path)
    return path


def _id_hash(ids: list[str], seed: int) -> np.ndarray:
    """Stable uint64 per id (blake2b of "seed:id"): order-independent, same on every node and run."""
    digests = (hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest() for i in ids)
    return np.array([int.from_bytes(d, "little") for d in digests], dtype=np.uint64)


def _val_threshold(good: ray.data.Dataset, fraction: float, seed: int) -> int:
    """The hash at or below which a train row moves to val, so that round(n * fraction) rows do."""
    hashes = [
        _id_hash([str(x) for x in b["id"]], seed)
        for b in good.filter(expr=col("split") == "train").select_columns(["id"]).iter_batches(
            batch_size=8192, batch_format="numpy")
    ]
    h = np.sort(np.concatenate(hashes)) if hashes else np.zeros(0, np.uint64)
    k = int(round(len(h) * fraction))
    if fraction > 0 and len(h) >= 2:
        k = min(max(k, 1), len(h) - 1)  # val gets at least one row, train keeps at least one
    return -1 if k == 0 else int(h[k - 1])


def _carve_val(tb: pa.Table, seed: int, threshold: int) -> pa.Table:
    if threshold < 0:
        return tb
    to_val = _id_hash([str(x) for x in tb["id"].to_pylist()], seed) <= np.uint64(threshold)
    is_train = pc.equal(tb["split"], "train")
    split = pc.if_else(pc.and_(is_train, pa.array(to_val)), "val", tb["split"])
    return tb.set_column(tb.schema.get_field_index("split"), "split", split)


# ------------------------------------------------------------------------------------------ batches


class MMCollate(NumpyBatchCollateFn):
    """numpy batch -> dict[str, torch.Tensor] with the dtypes of the batch contract (mmfusion.batch).
    Columns outside the contract (id, split, ...) are dropped."""

    DTYPES: dict[str, torch.dtype] = {k: getattr(torch, name) for k, name in DTYPES.items()}

    def __init__(self, spec: InputSpec | None = None) -> None:
        super().__init__()
        self.required: tuple[str, ...] = input_keys(spec.modalities) if spec is not None else ()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        missing = [k for k in self.required if k not in batch]
        if missing:
            raise DataError(f"batch lacks {missing} (has {sorted(batch)}): "
                            "is this dataset from build_datasets?")
        out = {}
        for k, v in batch.items():
            dtype = self.DTYPES.get(k)
            if dtype is not None:  # writable + contiguous: torch.from_numpy shares memory without warnings
                out[k] = torch.from_numpy(np.require(np.asarray(v), requirements=("C", "W"))).to(dtype)
        return out


def iter_torch_batches(ds: ray.data.Dataset | ray.data.DataIterator, batch_size: int,
                       spec: InputSpec | None = None, shuffle_seed: int | None = None,
                       shuffle_buffer: int | None = None, drop_last: bool = False,
                       device: str | Literal["auto"] = "auto", prefetch_batches: int = 1,
                       ) -> Iterator[dict[str, torch.Tensor]]:
    """Collated torch batches from a dataset or a Train shard. shuffle_seed turns on a local shuffle buffer;
    pass seed + epoch for a different order every epoch."""
    kwargs: dict[str, Any] = {}
    if shuffle_seed is not None:
        kwargs = {"local_shuffle_buffer_size": shuffle_buffer or max(4 * batch_size, 256),
                  "local_shuffle_seed": shuffle_seed}
    return iter(ds.iter_torch_batches(batch_size=batch_size, collate_fn=MMCollate(spec), drop_last=drop_last,
                                      device=device, prefetch_batches=prefetch_batches, **kwargs))
