"""What the data pipeline decides, without Ray: the cache mode, the preprocessing actor pool's size, and
the statistics of one pass over the preprocessed rows (rows, rejects, the val carve-out, class counts, the
audio-statistics sample), and the id-hash row selections the pipeline applies to record tables.

    choose_cache("auto", estimated_bytes(spec, rows), object_store_bytes)  -> "memory" | "none", why
    stream_store_bytes(spec, block_rows)                                   -> none: the streams' store budget
    preprocess_actors(cluster_cpus, reserved_cpus, rows)                   -> actors in the pool
    stats = RowStats(); stats.add(batch) ...; stats.finish(seed, val_fraction, num_classes, sample_rows)
    carve_val(table, seed, threshold), in_sample(table, key, threshold)    -> Ray Data tasks over records

pipeline.py calls these; keeping them pure makes each decision a unit test.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmfusion.batch import InputSpec

CacheMode = Literal["memory", "none"]
# data.cache=auto materializes when the estimated preprocessed splits fit in this share of the object
# store: building them briefly holds two copies (all rows, then the per-split datasets), and training's own
# objects (checkpoints, batches in flight) need room too
AUTO_MEMORY_SHARE = 0.4
ROW_OVERHEAD_BYTES = 96  # per row beside the tensors: present, label, id and split strings, Arrow offsets
MIN_ROWS_PER_ACTOR = 512  # an actor costs seconds to start (torch imports): one block of rows at least
# data.cache=none: the object store a stream may fill, in blocks of preprocessed rows. Ray Data's own budget
# is half the object store, which a pipeline faster than training fills whatever the row count; a few blocks
# per operator keep the actors busy (bench/memory.py, bench/ingest.py)
STREAM_BLOCKS = 8
STREAM_MIN_BYTES = 64 * 1024 ** 2
STREAM_READ_TASKS = 2  # data.cache=none, data.read_parallelism unset: one read task feeds several actors
# data.cache=none: the audio feature mean/std are fitted on a seeded id-hash sample of at most this many train
# rows (only they are decoded a second time), not on a second pass over every row (220,000 on the large
# AVT-Digits variant). 20,000 clips of ~100 frames give each feature bin ~2M values: even counting clips, not
# frames, as the independent units, the standard error of a bin's mean is std / sqrt(20,000) = 0.7% of its
# std, far below anything a model trained on the standardized features notices
AUDIO_STATS_ROWS = 20_000


def estimated_row_bytes(spec: InputSpec) -> int:
    """Bytes one preprocessed row takes in the object store (uint8 images, int64 text, float32 audio)."""
    n = ROW_OVERHEAD_BYTES
    if "image" in spec.modalities:
        n += math.prod(spec.image_shape)  # uint8 (C, H, W)
    if "text" in spec.modalities:
        n += 2 * 8 * spec.max_text_len  # ids + mask, int64 (L,) each
    if "audio" in spec.modalities:
        n += 4 * math.prod(spec.audio_shape)  # float32 (1, F, T)
    return n


def stream_store_bytes(spec: InputSpec, block_rows: int) -> int:
    """data.cache=none: the object-store budget of the streams, a constant of the row size and the block size,
    never of the row count: STREAM_BLOCKS blocks of `block_rows` rows, at least STREAM_MIN_BYTES."""
    return max(STREAM_MIN_BYTES, STREAM_BLOCKS * block_rows * estimated_row_bytes(spec))


def choose_cache(setting: str, estimated_bytes: int, store_bytes: float) -> tuple[CacheMode, str]:
    """data.cache -> the mode the pipeline uses and the reason, for the log.

    memory: materialize the preprocessed splits (every epoch reads tensors); none: stream them from the
    files every epoch (object-store use bounded by the blocks in flight). auto: memory when the estimate fits
    in AUTO_MEMORY_SHARE of the object store, else none.
    """
    mib = 1024 ** 2
    size = f"preprocessed data ~{estimated_bytes / mib:.1f} MiB, object store {store_bytes / mib:.0f} MiB"
    if setting in ("memory", "none"):
        return setting, f"data.cache={setting} ({size})"  # type: ignore[return-value]
    if setting != "auto":
        raise ValueError(f"data.cache must be auto, memory or none, got {setting!r}")
    if estimated_bytes <= AUTO_MEMORY_SHARE * store_bytes:
        return "memory", f"data.cache=auto chose memory: {size} (fits in {AUTO_MEMORY_SHARE:.0%} of it)"
    return "none", (f"data.cache=auto chose none (streaming every epoch): {size} "
                    f"(more than {AUTO_MEMORY_SHARE:.0%} of it)")


def preprocess_actors(cluster_cpus: float, reserved_cpus: float, rows: int) -> int:
    """Preprocessor actors (1 CPU each): the CPUs training leaves free, never fewer than 1, and no more than
    there are blocks of MIN_ROWS_PER_ACTOR rows to hand out.

    reserved_cpus: what training holds while the pool runs (its workers' CPUs when the data streams during
    training; 0 when the data is materialized before training starts).
    """
    free = math.floor(cluster_cpus - reserved_cpus + 1e-9)
    return max(1, min(free, math.ceil(rows / MIN_ROWS_PER_ACTOR)))


def id_hash(ids: list[str], seed: int | str) -> np.ndarray:
    """Stable uint64 per id (blake2b of "seed:id"): order-independent, same on every node and run."""
    digests = (hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest() for i in ids)
    return np.array([int.from_bytes(d, "little") for d in digests], dtype=np.uint64)


def val_threshold(hashes: np.ndarray, fraction: float) -> int:
    """The hash at or below which a train row moves to val, so that round(n * fraction) rows do (-1: none)."""
    h = np.sort(hashes)
    k = int(round(len(h) * fraction))
    if fraction > 0 and len(h) >= 2:
        k = min(max(k, 1), len(h) - 1)  # val gets at least one row, train keeps at least one
    return -1 if k == 0 else int(h[k - 1])


def sample_key(seed: int) -> str:
    """The id-hash seed of the audio-statistics sample: salted, so the sample does not follow the val
    carve-out (which hashes with the bare seed)."""
    return f"audio-stats/{seed}"


def sample_threshold(hashes: np.ndarray, rows: int) -> int:
    """The hash at or below which `rows` of these rows lie (distinct hashes): -1 when they are no more than
    `rows` (keep them all)."""
    if rows < 1:
        raise ValueError(f"a sample needs at least one row, got {rows}")
    return -1 if len(hashes) <= rows else int(np.partition(hashes, rows - 1)[rows - 1])


def carve_val(tb: pa.Table, seed: int, threshold: int) -> pa.Table:
    """Ray Data task: the train rows whose id hash is at or below threshold move to val (-1: none do)."""
    if threshold < 0:
        return tb
    to_val = id_hash([str(x) for x in tb["id"].to_pylist()], seed) <= np.uint64(threshold)
    is_train = pc.equal(tb["split"], "train")
    split = pc.if_else(pc.and_(is_train, pa.array(to_val)), "val", tb["split"])
    return tb.set_column(tb.schema.get_field_index("split"), "split", split)


def in_sample(tb: pa.Table, key: str, threshold: int) -> pa.Table:
    """Ray Data task: the rows whose id hash (seeded with key) is at or below threshold (-1: every row)."""
    if threshold < 0:
        return tb
    return tb.filter(pa.array(id_hash([str(x) for x in tb["id"].to_pylist()], key) <= np.uint64(threshold)))


@dataclass
class SplitStats:
    num_rows: int  # rows read, rejected ones included
    bad: list[dict[str, Any]]  # undecodable rows: the meta columns and "error" (the rejects file)
    empty: int  # fine rows with none of the configured modalities (skipped, not counted as bad)
    threshold: int  # the val carve-out's hash threshold (-1: no carve-out)
    # the audio-statistics sample: good train rows whose sample_key hash is at or below it (-1: all rows)
    sample_threshold: int = -1
    rows: dict[str, int] = field(default_factory=dict)  # good rows per split, after the carve-out
    class_counts: list[int] = field(default_factory=list)  # good train rows per label index


class RowStats:
    """Accumulates numpy batches of the preprocessed rows' small columns (id, split, label, error and the
    meta columns) in one pass; `finish` turns them into SplitStats."""

    def __init__(self, empty_prefix: str) -> None:
        self.empty_prefix = empty_prefix
        self.num_rows = 0
        self.bad: list[dict[str, Any]] = []
        self.empty = 0
        self.ids: list[np.ndarray] = []  # good rows only
        self.splits: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []

    def add(self, batch: dict[str, np.ndarray]) -> None:
        errors = np.asarray(batch["error"]).astype(str)  # (n,)
        self.num_rows += len(errors)
        failed = errors != ""
        empty = np.char.startswith(errors, self.empty_prefix)
        self.empty += int(empty.sum())
        for i in np.flatnonzero(failed & ~empty):
            self.bad.append({k: v[i].item() if hasattr(v[i], "item") else v[i] for k, v in batch.items()
                             if k != "label"})
        good = ~failed
        self.ids.append(np.asarray(batch["id"])[good].astype(str))
        self.splits.append(np.asarray(batch["split"])[good].astype(str))
        self.labels.append(np.asarray(batch["label"], dtype=np.int64)[good])

    def finish(self, seed: int, val_fraction: float | None, num_classes: int,
               sample_rows: int | None = None) -> SplitStats:
        """val_fraction: carve val out of train (by id hash, see id_hash) when not None. sample_rows: the
        threshold of a sample of that many good train rows (after the carve-out), by an id hash seeded with
        sample_key(seed) (SplitStats.sample_threshold; -1 when train has no more rows than that)."""
        ids = np.concatenate(self.ids) if self.ids else np.zeros(0, str)
        splits = np.concatenate(self.splits) if self.splits else np.zeros(0, str)
        labels = np.concatenate(self.labels) if self.labels else np.zeros(0, np.int64)
        threshold = -1
        if val_fraction is not None:
            train = splits == "train"
            hashes = id_hash(ids[train].tolist(), seed)
            threshold = val_threshold(hashes, val_fraction)
            if threshold >= 0:
                moved = np.zeros(len(splits), bool)
                moved[np.flatnonzero(train)] = hashes <= np.uint64(threshold)
                splits = np.where(moved, "val", splits)
        sample = -1
        if sample_rows is not None:
            sample = sample_threshold(id_hash(ids[splits == "train"].tolist(), sample_key(seed)), sample_rows)
        rows = {s: int((splits == s).sum()) for s in ("train", "val", "test")}
        y = labels[(splits == "train") & (labels >= 0)]  # -1: unlabelled
        counts = np.bincount(y, minlength=num_classes)[:num_classes] if num_classes else np.zeros(0)
        return SplitStats(num_rows=self.num_rows, bad=self.bad, empty=self.empty, threshold=threshold,
                          sample_threshold=sample, rows=rows, class_counts=[int(c) for c in counts])
