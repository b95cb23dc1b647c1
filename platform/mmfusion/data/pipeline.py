"""The Ray Data pipeline: records -> preprocessed, validated train/val(/test) datasets -> collated torch
batches.

    summarize (driver: columns, rows per split, labels); data.cache auto -> memory | none (plan.py)
      -> from_items(read units).map_batches(read + load media, TaskPoolStrategy)        # readers.py
      -> map_batches(Preprocessor, ActorPoolStrategy sized to the free CPUs)            # preprocessor.py
      -> memory: materialize once | none: stream
      -> one pass over the small columns: rejects counted and written, max_bad_fraction enforced, val carved
         out of train by a seeded id hash when the data has none, class counts
      -> (training) audio feature mean/std measured on the train split (none: on a seeded id-hash sample of
         plan.AUDIO_STATS_ROWS train rows, picked before preprocessing), stored in cfg.audio.stats, applied
      -> per-split datasets: memory: materialized (every epoch reads tensors, no decoding again);
         none: lazy, re-read and re-preprocessed every epoch (object-store use independent of row count)
      -> data.shuffle=global: train re-shuffled every epoch
    MMCollate turns numpy batches into the torch batch contract of mmfusion.batch (uint8 images normalized).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import ray
import ray.data
import torch
from ray.data import ActorPoolStrategy, DataContext, RandomSeedConfig, TaskPoolStrategy
from ray.data.collate_fn import NumpyBatchCollateFn
from ray.data.expressions import col

from mmfusion.batch import DTYPES, InputSpec, input_keys
from mmfusion.config import AudioStats, DataConfig
from mmfusion.data import plan, readers, rejects, schema
from mmfusion.data.audio import apply_stats, audio_moments, fit_stats
from mmfusion.data.image import normalize_images
from mmfusion.data.preprocessor import AUG_KEYS, EMPTY_ROW, META_COLUMNS, Preprocessor, input_spec
from mmfusion.data.text import load_tokenizer
from mmfusion.errors import DataError
from mmfusion.runtime import usable_cpus

log = logging.getLogger(__name__)

PREPROCESS_BATCH = 128  # rows per Preprocessor call: amortizes the vectorised torch work
READ_CPUS = 0.5  # per read task (I/O-bound) when reads run apart from the Preprocessor actors
PREPROCESS_BLOCK = 512  # rows per block handed to a Preprocessor actor
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
    cache: str = "memory"  # memory: the datasets are materialized; none: they stream from the files


def build_datasets(cfg: DataConfig, splits: tuple[str, ...] = ("train", "val"), seed: int = 0,
                   labels: list[str] | None = None, train_cpus: float = 0.0) -> DatasetBundle:
    """Read, decode and preprocess the dataset at cfg.path into Ray Datasets of model-ready rows.

    Args:
        cfg: the data section of the experiment config.
        splits: which of "train", "val", "test" to build. A missing val split is carved out of train
            (cfg.val_fraction of it, chosen by a hash of the row id and `seed`, so it is stable across runs).
        seed: the experiment seed (val carve-out only).
        labels: class names to index labels with (an artifact's labels at evaluation time); default: the
            sorted unique labels of the train split.
        train_cpus: the CPUs training will hold while the data streams (data.cache none): the
            preprocessing pool gets the rest of the cluster's CPUs.
    data.cache: memory materializes the preprocessed splits once (every epoch then reads tensors); none
    streams them from the files every epoch (object-store use bounded by the blocks in flight, whatever the
    row count); auto picks from the estimated preprocessed size against the object store and logs why. Both
    make one pass first (rows, rejects, the bad-row threshold, the val carve-out, class counts).
    data.shuffle=global: the train dataset is re-shuffled as a whole every epoch (seeded).
    data.text.augment_typo_rate > 0 (with "train" requested): the train rows' text gets typos (seeded by
    `seed` and the row id) when it is preprocessed; rows carved out into val keep their clean text.
    Training (labels not given, "train" requested): when audio is configured with data.audio.normalize and
    without data.audio.stats, the mean/std of the train split's features are measured here (streamed data
    over more than plan.AUDIO_STATS_ROWS train rows: on a sample of that many, by a hash of the row id and
    `seed`, so only they are decoded again), written into `cfg.audio.stats` (so the experiment config saved
    in the artifact carries them) and applied to every split. With stats already set (an artifact's
    config), the Preprocessor applies them directly.
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
    rows = sum(n for s, n in summary.rows.items() if s in read_splits)
    mode, why = plan.choose_cache(cfg.cache, rows * plan.estimated_row_bytes(spec), _object_store_bytes())
    log.info("%s", why)
    actors = plan.preprocess_actors(usable_cpus(), train_cpus if mode == "none" else 0.0, rows)
    read_cfg = cfg
    if mode == "none":
        _bound_streams(plan.stream_store_bytes(spec, PREPROCESS_BLOCK))
        if cfg.read_parallelism < 0:  # reads outrun the pool: a few tasks, so raw blocks do not pile up
            read_cfg = cfg.model_copy(update={"read_parallelism": plan.STREAM_READ_TASKS})

    augment = "train" in splits and "text" in cfg.modalities and cfg.text.augment_typo_rate > 0
    augment_seed = seed if augment else None
    if augment_seed is not None:
        log.info("data.text.augment_typo_rate=%g: the train split's text gets typos (seed %d)",
                 cfg.text.augment_typo_rate, seed)
    processed = _preprocessed(read_cfg, summary, read_splits, labels, actors, augment_seed=augment_seed)
    if mode == "memory":  # every epoch reads tensors instead of decoding again
        processed = processed.materialize()
    sample_rows = plan.AUDIO_STATS_ROWS if fit_audio and mode == "none" else None  # memory: exact, cheap
    stats = _row_stats(processed, seed, cfg.val_fraction if carve_val else None, len(labels), sample_rows)
    rejects_path = _write_rejects(cfg, stats.bad)
    log.info("read %d rows (%s) from %s; %d rejected", stats.num_rows, ", ".join(read_splits), cfg.path,
             len(stats.bad))
    if stats.empty:
        log.info("%d rows have none of data.modalities %s and are skipped", stats.empty, cfg.modalities)
    rejects.check_bad_fraction(len(stats.bad), stats.num_rows - stats.empty, cfg.max_bad_fraction,
                               rejects_path)
    if carve_val:
        log.info("no val split in %s: using %.0f%% of train as val (seed %d)", cfg.path,
                 100 * cfg.val_fraction, seed)
    carve = {"seed": seed, "threshold": stats.threshold}

    def good_rows(split: str) -> ray.data.Dataset:
        """The split's decodable rows: from the materialized rows (memory), or a fresh stream from the
        files that is carved and filtered before preprocessing, so val costs its own rows only (none)."""
        if mode == "memory":
            ds = processed.filter(expr=col("error") == "")
            if carve_val:
                ds = ds.map_batches(plan.carve_val, batch_format="pyarrow", fn_kwargs=carve)
            return use_augmented(ds.filter(expr=col("split") == split), split, augment_seed is not None)
        source = "train" if carve_val and split == "val" else split
        ds = _preprocessed(read_cfg, summary, [source], labels, actors, carve if carve_val else None,
                           split, initial=1, augment_seed=augment_seed).filter(expr=col("error") == "")
        return use_augmented(ds, split, augment_seed is not None)

    good = {s: good_rows(s) for s in splits}
    if fit_audio:
        train = good["train"]
        if stats.sample_threshold >= 0:  # only the sampled rows are read and preprocessed again
            log.info("audio statistics from a sample of %d of %d train rows (id hash, seed %d)",
                     plan.AUDIO_STATS_ROWS, stats.rows["train"], seed)
            sample = (plan.sample_key(seed), stats.sample_threshold, plan.AUDIO_STATS_ROWS)
            train = _preprocessed(read_cfg, summary, ["train"], labels, actors, carve if carve_val else None,
                                  "train", sample=sample).filter(expr=col("error") == "")
        else:
            log.info("audio statistics from all %d train rows", stats.rows["train"])
        cfg.audio.stats = _fit_audio_stats(train, cfg)
        if cfg.audio.stats is not None:
            good = {s: _apply_audio(d, cfg) for s, d in good.items()}
    drop = [*META_COLUMNS, "error"]  # every Preprocessor output over RECORD_SCHEMA records has them
    out: dict[str, ray.data.Dataset | None] = {s: None for s in schema.SPLITS}
    for s in splits:
        out[s] = good[s].drop_columns(drop)
        if mode == "memory":  # the unsplit blocks can then be freed
            out[s] = out[s].materialize()
    if "val" in splits and stats.rows["val"] == 0:
        log.warning("the val split of %s is empty", cfg.path)
    if out["train"] is not None and cfg.shuffle == "global":  # a new order every epoch, reproducible
        out["train"] = out["train"].random_shuffle(
            seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))
    return DatasetBundle(train=out["train"], val=out["val"], test=out["test"], labels=labels, spec=spec,
                         num_rejected=len(stats.bad), num_rows=stats.num_rows, rejects_path=rejects_path,
                         train_rows=stats.rows["train"] if "train" in splits else 0,
                         val_rows=stats.rows["val"] if "val" in splits else 0,
                         test_rows=stats.rows["test"] if "test" in splits else 0,
                         class_counts=stats.class_counts if "train" in splits else [], cache=mode)


def _row_stats(processed: ray.data.Dataset, seed: int, val_fraction: float | None, num_classes: int,
               sample_rows: int | None = None) -> plan.SplitStats:
    """One pass over the small columns of the preprocessed rows: rows, rejects, val carve-out, counts, the
    audio-statistics sample's threshold. Over streamed data (data.cache=none) this pass preprocesses every
    row once, keeping none of it."""
    stats = plan.RowStats(EMPTY_ROW)
    columns = [*META_COLUMNS, "label", "error"]
    for batch in processed.select_columns(columns).iter_batches(batch_size=8192, batch_format="numpy"):
        stats.add(batch)
    return stats.finish(seed, val_fraction, num_classes, sample_rows)


def _fit_audio_stats(train: ray.data.Dataset, cfg: DataConfig) -> AudioStats | None:
    """The audio feature mean/std over the train rows that have audio (a per-batch sum and sum of squares,
    added up on the driver); None when no train row has audio."""
    column = list(cfg.modalities).index("audio")
    parts = (train.select_columns(["audio", "present"])
             .map_batches(audio_moments, batch_format="numpy", fn_kwargs={"column": column}).take_all())
    count = sum(int(p["count"]) for p in parts)
    if count == 0:
        log.warning("no train row of %s has audio: audio features are not standardized", cfg.path)
        return None
    sums = np.sum([p["sums"] for p in parts], axis=0)  # (F,) float64
    squares = np.sum([p["squares"] for p in parts], axis=0)
    log.info("audio features standardized (%s) with the mean/std of %d train frames", cfg.audio.normalize,
             count)
    return fit_stats(count, sums, squares, cfg.audio.normalize)


def _apply_audio(ds: ray.data.Dataset, cfg: DataConfig) -> ray.data.Dataset:
    return ds.map_batches(apply_stats, batch_format="numpy",
                          fn_kwargs={"stats": cfg.audio.stats, "column": list(cfg.modalities).index("audio")})


def use_augmented(ds: ray.data.Dataset, split: str, augmented: bool) -> ray.data.Dataset:
    """One split's rows with one pair of text columns: the train split's augmented tokens become "text" and
    "text_mask"; every other split drops them (its rows, those carved out of train included, stay clean)."""
    if not augmented:
        return ds
    if split != "train":
        return ds.drop_columns(list(AUG_KEYS.values()))
    return ds.drop_columns(list(AUG_KEYS)).rename_columns({v: k for k, v in AUG_KEYS.items()})


def _preprocessed(cfg: DataConfig, summary: readers.DatasetSummary, splits: list[str], labels: list[str],
                  actors: int, carve: dict[str, int] | None = None, keep: str | None = None,
                  initial: int | None = None, augment_seed: int | None = None,
                  sample: tuple[str, int, int] | None = None) -> ray.data.Dataset:
    """Records of `splits` -> Preprocessor rows, over a pool of up to `actors` actors (lazy), `initial` of
    them (default all) started at once. carve (seed, threshold) moves train rows to val before
    preprocessing, and keep then leaves only that split's rows. augment_seed: the Preprocessor adds the
    train rows' augmented text columns (data.text.augment_typo_rate). sample (key, threshold, rows): only
    the rows of that id-hash sample (plan.in_sample, about `rows` of them) are preprocessed."""
    units = [u.as_row() for u in readers.plan_units(summary.files, MANIFEST_UNIT_ROWS)]
    rows = sum(n for s, n in summary.rows.items() if s in splits)
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
    if carve is not None:
        ds = ds.map_batches(plan.carve_val, batch_format="pyarrow", fn_kwargs=carve)
    if keep is not None:
        ds = ds.filter(expr=col("split") == keep)
    if sample is not None:
        key, threshold, rows = sample
        ds = ds.map_batches(plan.in_sample, batch_format="pyarrow",
                            fn_kwargs={"key": key, "threshold": threshold})
    if actors > 1:
        ds = ds.repartition(target_num_rows_per_block=PREPROCESS_BLOCK)  # streaming, no shuffle
    log.info("preprocessing %d rows (%s) with up to %d actor(s)", rows, keep or ", ".join(splits), actors)
    return ds.map_batches(
        Preprocessor,
        # a copy as it is now: the stream runs later, after build_datasets may have set cfg.audio.stats
        # (which it applies in a step of its own)
        fn_constructor_kwargs={"cfg": cfg.model_copy(deep=True), "labels": labels, "num_threads": 1,
                               "uint8_images": True, "augment_seed": augment_seed},
        batch_size=PREPROCESS_BATCH,
        batch_format="numpy",
        # streams that run beside training start small and grow, so val's pool does not hold train's CPUs
        compute=ActorPoolStrategy(min_size=1, max_size=actors, initial_size=initial or actors),
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


def _bound_streams(limit: int) -> None:
    """data.cache=none: cap the object store the streams may fill at `limit` bytes (Ray Data's default, half
    the store, lets a pipeline faster than training run ahead until it holds as many rows as fit). Set on the
    driver's DataContext: the datasets made from here on copy it, and Ray Train's ingest takes its resource
    limits from it (DataConfig.default_ingest_options)."""
    ctx = DataContext.get_current()
    ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
        object_store_memory=limit)
    log.info("data.cache=none: the streams hold at most %.0f MiB of the object store", limit / 1024 ** 2)


def _object_store_bytes() -> float:
    """The cluster's object store capacity (Ray's own default when Ray is not started yet: 30% of RAM)."""
    if ray.is_initialized():
        return float(ray.cluster_resources().get("object_store_memory", 0))
    return 0.3 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _write_rejects(cfg: DataConfig, bad: list[dict[str, Any]]) -> Path | None:
    path = rejects.update_rejects(rejects.default_rejects_path(cfg.path, cfg.rejects_path), bad)
    if path is not None:
        log.warning("%d rejected rows written to %s", len(bad), path)
    return path


# ------------------------------------------------------------------------------------------ batches


EMB_SUFFIX = "_emb"  # cached embeddings of frozen encoders, float32 (B, hidden) (train/embedding_cache.py)


class MMCollate(NumpyBatchCollateFn):
    """numpy batch -> dict[str, torch.Tensor] with the dtypes of the batch contract (mmfusion.batch).
    Columns outside the contract (id, split, ...) are dropped. uint8 images (as preprocessed and stored) are
    normalized here, in the worker, with the spec's image_mean/std (mmfusion.data.image.normalize_images,
    the function serving uses), so the object store holds 1 byte per pixel instead of 4."""

    DTYPES: dict[str, torch.dtype] = {k: getattr(torch, name) for k, name in DTYPES.items()}

    def __init__(self, spec: InputSpec | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.required: tuple[str, ...] = input_keys(spec.modalities) if spec is not None else ()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        missing = [k for k in self.required if k not in batch]
        if missing:
            raise DataError(f"batch lacks {missing} (has {sorted(batch)}): "
                            "is this dataset from build_datasets?")
        out = {}
        for k, v in batch.items():
            dtype = self.DTYPES.get(k) or (torch.float32 if k.endswith(EMB_SUFFIX) else None)
            if dtype is not None:  # writable + contiguous: torch.from_numpy shares memory without warnings
                x = torch.from_numpy(np.require(np.asarray(v), requirements=("C", "W")))
                out[k] = self._image(x, batch) if k == "image" and x.dtype == torch.uint8 else x.to(dtype)
        return out

    def _image(self, pixels: torch.Tensor, batch: dict[str, np.ndarray]) -> torch.Tensor:
        """uint8 (B, C, H, W) -> normalized float32 (B, C, H, W); rows without an image stay zeros."""
        if self.spec is None or "image" not in self.spec.modalities:
            raise DataError("uint8 images need the InputSpec (image_mean/std) to be normalized: "
                            "pass spec to MMCollate / iter_torch_batches")
        present = None
        if "present" in batch:
            present = torch.from_numpy(np.asarray(batch["present"], dtype=bool)[
                :, self.spec.modalities.index("image")].copy())  # (B,)
        return normalize_images(pixels, present, self.spec.image_mean, self.spec.image_std)


def iter_torch_batches(ds: ray.data.Dataset | ray.data.DataIterator, batch_size: int,
                       spec: InputSpec | None = None, shuffle_seed: int | None = None,
                       shuffle_buffer: int | None = None, drop_last: bool = False,
                       device: str | Literal["auto"] = "auto", prefetch_batches: int = 1,
                       pin_memory: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Collated torch batches from a dataset or a Train shard. shuffle_seed turns on a local shuffle buffer;
    pass seed + epoch for a different order every epoch. With device "auto" in a Train worker, Ray moves each
    collated batch to the worker's device on its prefetch thread; pin_memory (GPU workers) pins it first, so
    that copy is an asynchronous DMA from page-locked memory."""
    kwargs: dict[str, Any] = {}
    if shuffle_seed is not None:
        kwargs = {"local_shuffle_buffer_size": shuffle_buffer or max(4 * batch_size, 256),
                  "local_shuffle_seed": shuffle_seed}
    return iter(ds.iter_torch_batches(batch_size=batch_size, collate_fn=MMCollate(spec), drop_last=drop_last,
                                      device=device, prefetch_batches=prefetch_batches, pin_memory=pin_memory,
                                      **kwargs))
