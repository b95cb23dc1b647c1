"""The KTuberling data card: sources (Debian package versions, file checksums), how the build chose its rows,
and per split the class counts, languages, image sizes, audio formats and missing fields."""

from __future__ import annotations

import struct
from collections import Counter
from pathlib import Path
from typing import Any

from mmfusion.datasets.ktuberling.sources import FREEDICT_LANGUAGES, Sources, Sprite
from mmfusion.datasets.output import card_header, output_files


def _png_size(png: bytes) -> tuple[int, int]:
    w, h = struct.unpack(">II", png[16:24])  # IHDR: width, height right after the signature and chunk header
    return int(w), int(h)


def _audio_info(path: Path, cache: dict[Path, tuple[int, int, float, str]]) -> tuple[int, int, float, str]:
    """(sample rate, channels, seconds, "FORMAT/SUBTYPE") of a source recording."""
    if path not in cache:
        import soundfile as sf

        i = sf.info(str(path))
        cache[path] = (int(i.samplerate), int(i.channels), round(float(i.duration), 3),
                       f"{i.format}/{i.subtype}")
    return cache[path]


def _range(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    v = sorted(values)
    return {"min": v[0], "median": v[len(v) // 2], "max": v[-1]}


def _split_stats(rows: list[dict[str, Any]], pngs: dict[Sprite, bytes],
                 cache: dict[Path, tuple[int, int, float, str]]) -> dict[str, Any]:
    sizes = [_png_size(pngs[r["sprite"]]) for r in rows if r["missing"] != "image"]
    audio = [_audio_info(r["audio_file"], cache) for r in rows if r["missing"] != "audio"]
    n = len(rows)
    present = {"image": len(sizes), "text": sum(r["text"] is not None for r in rows), "audio": len(audio)}
    return {
        "rows": n,
        "sprites": len({r["sprite"] for r in rows}),
        "classes": dict(sorted(Counter(r["label"] for r in rows).items(), key=lambda kv: (-kv[1], kv[0]))),
        "modality_present": present,
        "modality_missing": {m: n - c for m, c in present.items()},
        "text_languages": dict(sorted(Counter(r["text_language"] or "(none)" for r in rows).items())),
        "audio_languages": dict(sorted(Counter(r["audio_language"] for r in rows).items())),
        "image": {"mode": "RGBA", "width": _range([w for w, _ in sizes]),
                  "height": _range([h for _, h in sizes])},
        "audio": {"sample_rates": dict(sorted(Counter(a[0] for a in audio).items())),
                  "channels": dict(sorted(Counter(a[1] for a in audio).items())),
                  "formats": dict(sorted(Counter(a[3] for a in audio).items())),
                  "seconds": _range([a[2] for a in audio])},
    }


def data_card(name: str, version: int, variant: str, seed: int, src: Sources,
              plan: dict[str, list[dict[str, Any]]], pngs: dict[Sprite, bytes], root: Path,
              settings: dict[str, Any]) -> dict[str, Any]:
    """The data card of a finished build (`root` holds its Parquet files)."""
    cache: dict[Path, tuple[int, int, float, str]] = {}
    splits = {s: _split_stats(rows, pngs, cache) for s, rows in plan.items()}
    return {
        **card_header(name, version, variant, seed, "mmfusion.datasets.ktuberling"),
        "description": "KDE KTuberling objects: a sprite (RGBA PNG rendered from the theme's SVG), a "
                       "real recording of the object's spoken name in one of many languages (the package's "
                       "OGG/Opus/WAV file as shipped), and the object's name from a FreeDict dictionary; "
                       "label = the theme. Modalities are aligned by object. Real data, no synthesis; only "
                       "the sprite zoom and the row choices are the builder's.",
        "modalities": ["image", "text", "audio"],
        "labels": sorted(set(settings["labels"].values())),
        "schema": {"id": "string", "split": "string", "image": "binary (PNG, RGBA, transparent background)",
                   "text": "string (one dictionary sense of the object's name, or null)",
                   "audio": "binary (OGG Vorbis, OGG Opus or WAV, as shipped by ktuberling-data)",
                   "label": "string (the theme)"},
        "layout": "<split>.parquet; per-row provenance (theme, SVG element, sound, languages, file) in "
                  "_provenance/<split>.parquet",
        "held_out": {
            "test": "sprites never seen in train or val (stratified per theme); texts in languages train "
                    f"never reads ({', '.join(settings['text_languages']['test'])}); object names that no "
                    "training row says (objects whose sound name has no training sprite)",
            "val": "sprites never seen in train; the training text languages",
        },
        "pairing": "aligned by object: each row is one sprite with a recording of its name in one language "
                   f"(up to {settings['audio_per_sprite']} languages per sprite, seeded) and a dictionary "
                   "name of the same object in one of the split's text languages (seeded language and sense)",
        "missing": f"{settings['missing_share']:.0%} of the rows lose their image or their audio (seeded); a "
                   "text is null where no dictionary of the split's languages has the object's name",
        "settings": settings,
        "sources": {
            "debian_packages": src.packages,
            "text_dictionaries": {lang: f"dict-freedict-eng-{c}" for lang, c in FREEDICT_LANGUAGES.items()},
            "sprites": {"count": len(src.sprites),
                        "themes": dict(sorted(Counter(s.theme for s in src.sprites).items()))},
            "recordings": {"sound_names": len(src.recordings),
                           "languages": dict(sorted(Counter(lang for r in src.recordings.values()
                                                            for lang in r).items()))},
            "files": src.files,
        },
        "splits": splits,
        "files": output_files(root),
    }
