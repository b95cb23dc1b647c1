"""The recipe of AVT-Digits: which languages, voices and degradations go into each split, in what shares, and
the size variants. The builder (mmfusion.datasets.avt_digits) and its data card read these numbers."""

from __future__ import annotations

from dataclasses import dataclass

NAME = "avt-digits"
FORMAT_VERSION = 1  # bump when the layout or the meaning of a column changes
SPLITS = ("train", "val", "test")

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
                   "+klatt", "+klatt2", "+klatt3", "+croak", "+whisper"]  # speakers (formants, voicing)
ESPEAK_RATE = (110, 240)  # words per minute, [low, high)
ESPEAK_PITCH = (15, 90)  # 0-99, [low, high)
VAL_VOICE_SHARE = 0.2  # share of espeak voice settings kept for val only (val hears voices train never heard)

# The real recordings held out for test: Debian package -> its voice folder's name, looked up with dpkg -L.
ASTERISK_PACKAGES = [f"asterisk-core-sounds-{lang}-wav" for lang in ("en", "es", "fr", "it", "ru")]

# Per-record audio perturbation: (SNR range dB, speed range, chance of a telephone-band channel).
AUDIO_PERTURB = {
    "train": ((10.0, 30.0), (0.9, 1.1), 0.5),
    "val": ((10.0, 30.0), (0.9, 1.1), 0.5),
    "test": ((10.0, 30.0), (1.0, 1.0), 0.0),  # real telephone recordings: no synthetic channel or speed
}
# Image degradation: (share of rows degraded, strength range). Test is degraded more often and harder.
# Calibrated with bench/avt_calibration.py: a small CNN scores ~98% on clean MNIST test digits, ~80% on these.
IMAGE_DEGRADE = {"train": (0.25, (0.0, 0.6)), "val": (0.25, (0.0, 0.6)), "test": (0.85, (0.5, 1.0))}
# Present but uninformative training fields: an unreadable text (random letters), a recording buried in noise.
# Without them text and audio are near-perfect on train (clean words in known languages, synthetic speech), a
# fused model learns to trust them blindly, and on test (unseen languages, real voices) it does no better than
# image alone. With them it learns to weigh the modalities: measured with bench/fusion_vs_single.py, fused
# 0.90 vs best single 0.82 (without: 0.83 vs 0.83). Test has none: its imperfection is the real shift in
# language and voice.
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
