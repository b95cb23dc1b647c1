"""Planning and writing AVT-Digits shards: which MNIST image, clip and word each row gets, and the Parquet
files.
Every shard's random numbers depend only on (seed, split, shard), so shards can be written in any order and in
parallel processes."""

from __future__ import annotations

import logging
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from mmfusion.batch import MODALITIES
from mmfusion.datasets.avt_digits.recipe import (
    AUDIO_BURIED,
    AUDIO_BURIED_SNR,
    AUDIO_PERTURB,
    ESPEAK_OTHER_SHARE,
    ESPEAK_OTHER_VOICES,
    ESPEAK_PITCH,
    ESPEAK_RATE,
    ESPEAK_TEST_LANGUAGE_VOICES,
    ESPEAK_VARIANTS,
    IMAGE_DEGRADE,
    IMAGES_PER_SPLIT,
    MISSING_SHARE,
    ROW_GROUP_ROWS,
    SHARD_ROWS,
    SPLITS,
    TEXT_LANGUAGES,
    TEXT_TYPO_RATE,
    TEXT_UNREADABLE,
    VAL_VOICE_SHARE,
    Variant,
)

log = logging.getLogger(__name__)


@dataclass
class ShardContext:
    """Everything a shard needs, sent once to each worker process."""

    seed: int
    variant: str
    images: np.ndarray  # (5000, 28, 28) uint8
    labels: np.ndarray  # (5000,) int64
    clips: dict[str, dict[int, list[tuple[str, np.ndarray]]]]  # split -> digit -> [(voice, (T,) float32)]
    augment: bool
    sampler_languages: dict[str, list[str]] = field(default_factory=lambda: dict(TEXT_LANGUAGES))


@dataclass(frozen=True)
class ShardJob:
    split: str
    index: int  # shard number within the split
    start: int  # first row number of the shard within the split
    image_index: np.ndarray  # (n,) MNIST row per record
    missing: np.ndarray  # (n,) int8: -1 none, else the index in MODALITIES of the null modality
    path: Path  # the Parquet file to write
    provenance_path: Path


def split_images(labels: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Disjoint MNIST rows per split, stratified by class so every split has all ten digits in proportion."""
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    total = len(labels)
    for d in range(10):
        idx = rng.permutation(np.flatnonzero(labels == d))
        n_val = int(round(len(idx) * IMAGES_PER_SPLIT["val"] / total))
        n_test = int(round(len(idx) * IMAGES_PER_SPLIT["test"] / total))
        parts["val"].append(idx[:n_val])
        parts["test"].append(idx[n_val:n_val + n_test])
        parts["train"].append(idx[n_val + n_test:])
    return {s: rng.permutation(np.concatenate(p)) for s, p in parts.items()}


def voice_settings(n: int, rng: np.random.Generator) -> dict[str, list[Any]]:
    """`n` distinct espeak-ng (voice, rate, pitch) settings, split into train and val (disjoint)."""
    from mmfusion.datasets.avt_digits.audio import SynthConfig

    chosen: set[SynthConfig] = set()
    while len(chosen) < n:
        pool = ESPEAK_OTHER_VOICES if rng.random() < ESPEAK_OTHER_SHARE else ESPEAK_TEST_LANGUAGE_VOICES
        voice = pool[int(rng.integers(len(pool)))] + ESPEAK_VARIANTS[int(rng.integers(len(ESPEAK_VARIANTS)))]
        chosen.add(SynthConfig(voice, int(rng.integers(*ESPEAK_RATE)), int(rng.integers(*ESPEAK_PITCH))))
    ordered = sorted(chosen)  # a set's order is not reproducible: sort, then shuffle with the seeded RNG
    ordered = [ordered[i] for i in rng.permutation(len(ordered))]
    n_val = max(2, int(round(n * VAL_VOICE_SHARE)))
    return {"train": sorted(ordered[n_val:]), "val": sorted(ordered[:n_val])}


def voice_name(c: Any) -> str:
    return f"espeak-ng:{c.voice}:s{c.rate}:p{c.pitch}"


def _balanced_subset(pool: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """The first `n` of `pool` taken round-robin over the classes (pool order within a class). -> (n,)"""
    by_class = [pool[labels[pool] == d] for d in range(10)]
    rank = np.concatenate([np.arange(len(idx)) for idx in by_class])
    digit = np.concatenate([np.full(len(idx), d) for d, idx in enumerate(by_class)])
    order = np.lexsort((digit, rank))  # rank 0 of every class first, then rank 1, ...
    return np.concatenate(by_class)[order][:n]


def missing_codes(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n,) int8: -1 for a complete row, else which modality is null; ~MISSING_SHARE rows, all three
    modalities."""
    codes = np.full(n, -1, dtype=np.int8)
    k = min(n, max(len(MODALITIES), int(round(MISSING_SHARE * n))))
    rows = rng.choice(n, size=k, replace=False)
    codes[rows] = (np.arange(k) + rng.integers(len(MODALITIES))) % len(MODALITIES)
    return codes


def plan_shards(spec: Variant, pools: dict[str, np.ndarray], labels: np.ndarray, rng: np.random.Generator,
          root: Path) -> list[ShardJob]:
    jobs = []
    for split in SPLITS:
        n, pool = spec.rows[split], pools[split]
        if n == len(pool):  # small: every image of the split once
            image_index = pool
        elif n < len(pool):  # tiny: a class-balanced subset (every digit present), in a seeded order
            image_index = rng.permutation(_balanced_subset(pool, labels, n))
        else:  # large: cycle through the split's images, in a fresh order each pass (augmented per row)
            passes = -(-n // len(pool))
            image_index = np.concatenate([rng.permutation(pool) for _ in range(passes)])[:n]
        missing = missing_codes(n, rng)
        if spec.sharded:
            (root / split).mkdir()
            bounds = list(range(0, n, SHARD_ROWS))
            paths = [root / split / f"part-{i:05d}.parquet" for i in range(len(bounds))]
        else:
            bounds, paths = [0], [root / f"{split}.parquet"]
        for i, (a, path) in enumerate(zip(bounds, paths, strict=True)):
            b = bounds[i + 1] if i + 1 < len(bounds) else n
            prov = root / "_provenance" / (f"{split}-{i:05d}.parquet" if spec.sharded else f"{split}.parquet")
            jobs.append(ShardJob(split, i, a, image_index[a:b], missing[a:b], path, prov))
    return jobs


_WORKER_CTX: ShardContext | None = None


def _init_worker(ctx: ShardContext) -> None:
    global _WORKER_CTX
    _WORKER_CTX = ctx


def _worker_shard(job: ShardJob) -> dict[str, Any]:
    assert _WORKER_CTX is not None
    return _write_shard(_WORKER_CTX, job)


def run_shards(ctx: ShardContext, jobs: list[ShardJob], workers: int) -> list[dict[str, Any]]:
    """Write every shard; in `workers` processes when there are several shards. -> per-shard statistics"""
    from mmfusion.logs import progress

    t0 = time.perf_counter()
    if workers <= 1 or len(jobs) == 1:
        results = progress((_write_shard(ctx, j) for j in jobs), total=len(jobs), desc="shards", unit="shard")
        return [_log_progress(st, k, len(jobs), t0) for k, st in enumerate(results, 1)]
    # spawn, not fork: the caller may have threads (Ray, torch) that fork would copy in a broken state
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker,
                             initargs=(ctx,)) as pool:
        results = progress(pool.map(_worker_shard, jobs), total=len(jobs), desc="shards", unit="shard")
        return [_log_progress(st, k, len(jobs), t0) for k, st in enumerate(results, 1)]


def _log_progress(stats: dict[str, Any], done: int, total: int, t0: float) -> dict[str, Any]:
    log.info("%s shard %d: %d rows written (%d/%d shards, %.0f s)", stats["split"], stats["shard"],
             stats["rows"],
             done, total, time.perf_counter() - t0)
    return stats


def _write_shard(ctx: ShardContext, job: ShardJob) -> dict[str, Any]:
    """Generate and write one shard's records. Its RNG depends only on (seed, split, shard), so shards are
    order-independent."""
    import pyarrow as pa

    from mmfusion.datasets.avt_digits import audio, image, text

    rng = np.random.default_rng([ctx.seed, 1 + SPLITS.index(job.split), job.index])
    words = text.WordSampler(ctx.sampler_languages[job.split], TEXT_TYPO_RATE)
    snr, speed, channel_p = AUDIO_PERTURB[job.split]
    share, strength = IMAGE_DEGRADE[job.split]
    cols: dict[str, list[Any]] = {k: [] for k in ("id", "split", "image", "text", "audio", "label")}
    prov: dict[str, list[Any]] = {k: [] for k in ("id", "mnist_index", "image_degradation", "image_strength",
                                                  "text_language", "text_typos", "text_unreadable",
                                                  "audio_voice", "audio_buried", "missing")}
    for i, (mnist_row, miss) in enumerate(zip(job.image_index.tolist(), job.missing.tolist(), strict=True)):
        digit = int(ctx.labels[mnist_row])
        rid = f"{job.split}-{job.start + i:07d}"
        # every row draws the same random numbers whether or not a modality ends up null: a row's content
        # does not depend on which rows are missing something
        img = ctx.images[mnist_row]
        if ctx.augment:
            img = image.augment(img, rng)
        kinds: list[str] = []
        s = 0.0
        if rng.random() < share:
            s = float(rng.uniform(*strength))
            img, kinds = image.degrade(img, rng, s)
        word, lang, typos = words.sample(digit, rng)
        unreadable = bool(rng.random() < TEXT_UNREADABLE[job.split])
        if unreadable:
            word, typos = words.garble(lang, rng), 0
        voices = ctx.clips[job.split][digit]
        voice, clip = voices[int(rng.integers(len(voices)))]
        buried = bool(rng.random() < AUDIO_BURIED[job.split])
        wave = audio.perturb(clip, rng, AUDIO_BURIED_SNR if buried else snr, speed=speed, channel_p=channel_p)
        null = MODALITIES[miss] if miss >= 0 else None
        cols["id"].append(rid)
        cols["split"].append(job.split)
        cols["image"].append(None if null == "image" else image.encode_png(img))
        cols["text"].append(None if null == "text" else word)
        cols["audio"].append(None if null == "audio" else audio.encode_wav(wave))
        cols["label"].append(digit)
        prov["id"].append(rid)
        prov["mnist_index"].append(int(mnist_row))
        prov["image_degradation"].append("+".join(kinds))
        prov["image_strength"].append(round(s, 4))
        prov["text_language"].append(lang)
        prov["text_typos"].append(typos)
        prov["text_unreadable"].append(unreadable)
        prov["audio_voice"].append(voice)
        prov["audio_buried"].append(buried)
        prov["missing"].append(null)
    table = pa.table(cols, schema=parquet_schema())
    write_parquet(table, job.path)
    write_parquet(pa.table(prov, schema=provenance_schema()), job.provenance_path)
    return {"split": job.split, "shard": job.index, "rows": table.num_rows, "labels": Counter(cols["label"]),
            "present": Counter(m for m in MODALITIES for v in cols[m] if v is not None),
            "missing": Counter(v for v in prov["missing"] if v),
            "degraded": sum(1 for k in prov["image_degradation"] if k),
            "languages": Counter(prov["text_language"]), "typos": sum(1 for t in prov["text_typos"] if t),
            "unreadable": sum(prov["text_unreadable"]), "buried": sum(prov["audio_buried"]),
            "voices": Counter(prov["audio_voice"])}


def parquet_schema() -> Any:
    """The Parquet schema of AVT-Digits files: the record contract's id, split and modality columns
    (mmfusion.data.schema.RECORD_SCHEMA) and the label as int64 (the digit). pyarrow is imported here, not
    when the builder is imported."""
    import pyarrow as pa

    from mmfusion.data.schema import RECORD_SCHEMA

    columns = [RECORD_SCHEMA.field(c) for c in ("id", "split", *MODALITIES)]
    return pa.schema([*columns, pa.field("label", pa.int64())])


def provenance_schema() -> Any:
    """The Parquet schema of the per-row provenance files (_provenance/)."""
    import pyarrow as pa

    return pa.schema([("id", pa.string()), ("mnist_index", pa.int64()), ("image_degradation", pa.string()),
                      ("image_strength", pa.float64()), ("text_language", pa.string()),
                      ("text_typos", pa.int64()), ("text_unreadable", pa.bool_()),
                      ("audio_voice", pa.string()), ("audio_buried", pa.bool_()),
                      ("missing", pa.string())])


def write_parquet(table: Any, path: Path) -> None:
    """Deterministic Parquet: fixed row order, codec and row groups; no pandas metadata, no timestamps."""
    import pyarrow.parquet as pq

    pq.write_table(table, path, compression="zstd", compression_level=3, row_group_size=ROW_GROUP_ROWS,
                   use_dictionary=["split"], write_statistics=True)
