"""The AVT-Digits data card (data_card.json): sources with versions and checksums, the recipe, per-split
counts and every file's checksum."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from mmfusion.batch import MODALITIES
from mmfusion.datasets.avt_digits.recipe import (
    AUDIO_BURIED,
    AUDIO_BURIED_SNR,
    AUDIO_PERTURB,
    FORMAT_VERSION,
    IMAGE_DEGRADE,
    IMAGES_PER_SPLIT,
    MISSING_SHARE,
    NAME,
    SPLITS,
    TEXT_TYPO_RATE,
    TEXT_UNREADABLE,
    Variant,
)
from mmfusion.datasets.avt_digits.shards import voice_name
from mmfusion.datasets.output import card_header, output_files


def data_card(variant: str, seed: int, spec: Variant, sources: dict[str, Any], voices: dict[str, list[Any]],
              asterisk: dict[str, dict[int, Path]], stats: list[dict[str, Any]], root: Path,
              ) -> dict[str, Any]:
    per: dict[str, dict[str, Any]] = {}
    for s in SPLITS:
        parts = [st for st in stats if st["split"] == s]
        kinds = ("labels", "present", "missing", "languages", "voices")
        total: dict[str, Any] = {k: Counter() for k in kinds}
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
    return {
        **card_header(NAME, FORMAT_VERSION, variant, seed, "mmfusion.datasets.avt_digits"),
        "description": "Ten digit classes; each record pairs a real MNIST image, a spoken digit and a digit "
                       "word of the same class. Text languages are disjoint between train and test; test "
                       "audio is real recordings, train/val audio is synthetic.",
        "layout": ("<split>/part-NNNNN.parquet" if spec.sharded else "<split>.parquet")
                  + "; per-row provenance in _provenance/",
        "schema": {"id": "string", "split": "string", "image": "binary (PNG, 28x28 grayscale)",
                   "text": "string", "audio": "binary (WAV, 16-bit PCM mono 8 kHz)",
                   "label": "int64 (the digit 0-9)"},
        "missing_modalities": f"about {MISSING_SHARE:.0%} of the rows of each split have exactly one null "
                              "modality",
        "sources": sources,
        "generation": {
            "images_per_split": {s: int(min(spec.rows[s], IMAGES_PER_SPLIT[s])) for s in SPLITS},
            "image_augmentation": ("affine jitter (rotation, scale, shift) on every row" if spec.augment
                                   else "none"),
            "image_degradation": {s: {"share": IMAGE_DEGRADE[s][0], "strength": list(IMAGE_DEGRADE[s][1])}
                                  for s in SPLITS},
            "text_typo_rate": TEXT_TYPO_RATE,
            "text_unreadable_share": dict(TEXT_UNREADABLE),
            "audio_buried_share": dict(AUDIO_BURIED),
            "audio_buried_snr_db": list(AUDIO_BURIED_SNR),
            "audio_perturbation": {s: {"snr_db": list(AUDIO_PERTURB[s][0]),
                                       "speed": list(AUDIO_PERTURB[s][1]),
                                       "telephone_channel_p": AUDIO_PERTURB[s][2]} for s in SPLITS},
            "espeak_voice_settings": {s: [voice_name(c) for c in voices[s]] for s in ("train", "val")},
            "asterisk_voices": sorted(asterisk),
        },
        "splits": per,
        "files": output_files(root),
    }
