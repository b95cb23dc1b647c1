"""KTuberling: the second built-in real benchmark, built from Debian packages.

`mmfusion data build ktuberling --out DIR`. KTuberling is KDE's "potato guy" stamp game. Each of its themes (a
potato face, Egypt, the Moon, a pizzeria, Christmas, Robin Hood with Tux, a robot workshop, a train valley,
butterflies) has object sprites in an SVG board, and every object has a spoken name recorded by volunteers in
up to 25 languages. A record is one object:
    image  the object's sprite rendered from the theme's SVG: RGBA PNG, transparent background, 4-400 px
    audio  a real recording of the object's name in one language, the package's file as shipped: OGG Vorbis
           (stereo or mono, 44.1 or 22.05 kHz), OGG Opus 48 kHz or WAV (8, 22.05 or 44.1 kHz), about 0.3-4 s
    text   the object's name in one language from a FreeDict English-X dictionary (one sense, chosen by seed:
           "ball" may read "бал"), or the English name itself; null where no dictionary of the split knows it
    label  the theme (9 classes; the two potato themes are one class), strongly imbalanced
Modalities are aligned by object (not paired by class): all three describe the same object. A sprite gives up
to `audio_per_sprite` rows, one per recorded language (seeded choice): classes are as imbalanced as the game.

Splits are by sprite (stratified per theme): test sprites are never seen in training. Test texts are in
languages training never reads (it, sr: relatives of es/fr and ru), and some test objects have names that no
training row says.
About MISSING_SHARE of the rows have their image or their audio removed (seeded), on top of the texts that no
dictionary gives. The same seed gives byte-identical files on the same package versions.

Layout of OUT: train.parquet, val.parquet, test.parquet, _provenance/<split>.parquet, data_card.json.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from mmfusion.datasets.ktuberling.sources import (
    FREEDICT_LANGUAGES,
    Sources,
    Sprite,
    english_name,
    load_sources,
)
from mmfusion.datasets.output import atomic_build, check_out, is_build
from mmfusion.errors import DataError

log = logging.getLogger(__name__)

NAME = "ktuberling"
FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
LABELS = {"default_theme": "potato", "potato-game": "potato", "butterflies": "butterflies",
          "christmas": "christmas", "egypt": "egypt", "moon": "moon", "pizzeria": "pizzeria",
          "robin-tux": "robin-hood", "robot_workshop": "robot-workshop", "train_valley": "train-valley"}
SPRITE_SHARE = {"val": 0.12, "test": 0.2}  # share of each theme's sprites per held-out split (at least one)
TEXT_LANGUAGES = {"train": ["en", "de", "fr", "es", "ru"], "val": ["en", "de", "fr", "es", "ru"],
                  "test": ["it", "sr"]}
MISSING_SHARE = 0.04  # rows losing their image or audio (half each), besides the texts no dictionary has
VARIANTS = {  # sprites per theme per split (None: all), recorded languages per sprite
    "small": {"sprites": None, "audio_per_sprite": 8},
    "tiny": {"sprites": {"train": 3, "val": 1, "test": 1}, "audio_per_sprite": 2},
}
ROW_GROUP_ROWS = 500


def build_ktuberling(out: Path, seed: int = 0, variant: str = "small") -> Path:
    """Build KTuberling into `out` and return it. `out` must be new, empty, or a previous KTuberling build."""
    target = Path(out)
    out = target.resolve()
    if variant not in VARIANTS:
        raise DataError(f"unknown KTuberling variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise DataError(f"the KTuberling seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    check_out(out, NAME, "KTuberling")
    t0 = time.perf_counter()
    src = load_sources()
    rng = np.random.default_rng([seed, 7])
    parts = _split_sprites(src, rng, variant)  # split -> sprites (disjoint)

    from mmfusion.datasets.ktuberling.render import render_all

    chosen = sorted((sp for sprites in parts.values() for sp in sprites), key=_sprite_key)
    pngs = {sp: png for sp, png in zip(chosen, render_all(src.rsvg, chosen), strict=True) if png is not None}
    blank = sorted(f"{sp.theme}:{sp.element}" for sp in chosen if sp not in pngs)
    if blank:
        log.info("%d sprites have no visible pixels and are left out: %s", len(blank), ", ".join(blank))
    plan = _plan(src, {s: [sp for sp in sps if sp in pngs] for s, sps in parts.items()}, rng, variant)
    with atomic_build(out) as tmp:
        (tmp / "_provenance").mkdir()
        for split in SPLITS:
            _write_split(tmp, split, plan[split], pngs)
        from mmfusion.datasets.ktuberling.card import data_card

        settings = {**_settings(variant), "blank_sprites_left_out": blank}
        card = data_card(NAME, FORMAT_VERSION, variant, seed, src, plan, pngs, tmp, settings)
        (tmp / "data_card.json").write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n")
    log.info("KTuberling %s (seed %d): %s rows in %.1f s -> %s", variant, seed,
             "/".join(str(len(plan[s])) for s in SPLITS), time.perf_counter() - t0, out)
    return target


def _settings(variant: str) -> dict[str, Any]:
    return {"sprite_share": SPRITE_SHARE, "text_languages": TEXT_LANGUAGES, "missing_share": MISSING_SHARE,
            "labels": LABELS, **VARIANTS[variant]}


# ------------------------------------------------------------------------------------------ output folder


def is_ktuberling_build(path: Path) -> bool:
    return is_build(path, NAME)


# ------------------------------------------------------------------------------------------------- plan


def _sprite_key(s: Sprite) -> tuple[str, str]:
    return (s.theme, s.element)


def _split_sprites(src: Sources, rng: np.random.Generator, variant: str) -> dict[str, list[Sprite]]:
    """Disjoint sprites per split, stratified by theme; every theme in every split."""
    caps = VARIANTS[variant]["sprites"]
    parts: dict[str, list[Sprite]] = {s: [] for s in SPLITS}
    for theme in sorted({s.theme for s in src.sprites}):
        pool = sorted((s for s in src.sprites if s.theme == theme), key=_sprite_key)
        pool = [pool[i] for i in rng.permutation(len(pool))]
        n_val = max(1, round(len(pool) * SPRITE_SHARE["val"]))
        n_test = max(1, round(len(pool) * SPRITE_SHARE["test"]))
        chosen = {"val": pool[:n_val], "test": pool[n_val:n_val + n_test], "train": pool[n_val + n_test:]}
        for split in SPLITS:
            parts[split] += chosen[split][:caps[split]] if caps else chosen[split]
    return parts


def _plan(src: Sources, parts: dict[str, list[Sprite]], rng: np.random.Generator,
          variant: str) -> dict[str, list[dict[str, Any]]]:
    """Rows per split: each sprite with up to `audio_per_sprite` recorded languages, texts, missing fields."""
    k = VARIANTS[variant]["audio_per_sprite"]
    plan: dict[str, list[dict[str, Any]]] = {}
    for split, sprites in parts.items():
        rows = []
        for sp in sprites:
            langs = sorted(src.recordings[sp.sound])
            for li in sorted(rng.choice(len(langs), size=min(k, len(langs)), replace=False).tolist()):
                lang = langs[li]
                text, text_lang = _text(src, sp.sound, TEXT_LANGUAGES[split], rng)
                rows.append({"sprite": sp, "label": LABELS.get(sp.theme, sp.theme), "audio_language": lang,
                             "audio_file": src.recordings[sp.sound][lang], "text": text,
                             "text_language": text_lang, "english": english_name(sp.sound), "missing": None})
        rows = [rows[i] for i in rng.permutation(len(rows))]
        n_missing = int(round(MISSING_SHARE * len(rows)))
        for j, i in enumerate(sorted(rng.choice(len(rows), size=n_missing, replace=False).tolist())):
            rows[i]["missing"] = ("image", "audio")[j % 2]
        for i, r in enumerate(rows):
            r["id"] = f"{split}-{i:05d}"
        plan[split] = rows
    return plan


def _text(src: Sources, sound: str, languages: list[str],
          rng: np.random.Generator) -> tuple[str | None, str | None]:
    """One sense of the object's name in one of `languages` that has it (seeded); (None, None) if none has."""
    have = [lang for lang in languages if src.glosses[sound].get(lang)]
    u = rng.random(2)  # always two draws: a row's randomness does not depend on what the dictionaries hold
    if not have:
        return None, None
    lang = have[int(u[0] * len(have))]
    senses = src.glosses[sound][lang]
    return senses[int(u[1] * len(senses))], lang


# ------------------------------------------------------------------------------------------------ write


def RECORD_SCHEMA() -> Any:  # noqa: N802 - a function so that importing this module does not import pyarrow
    import pyarrow as pa

    return pa.schema([("id", pa.string()), ("split", pa.string()), ("image", pa.binary()),
                      ("text", pa.string()), ("audio", pa.binary()), ("label", pa.string())])


def _write_split(root: Path, split: str, rows: list[dict[str, Any]], pngs: dict[Sprite, bytes]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    audio_cache: dict[Path, bytes] = {}
    cols: dict[str, list[Any]] = {k: [] for k in ("id", "split", "image", "text", "audio", "label")}
    for r in rows:
        f = r["audio_file"]
        if f not in audio_cache:
            audio_cache[f] = f.read_bytes()
        cols["id"].append(r["id"])
        cols["split"].append(split)
        cols["image"].append(None if r["missing"] == "image" else pngs[r["sprite"]])
        cols["text"].append(r["text"])
        cols["audio"].append(None if r["missing"] == "audio" else audio_cache[f])
        cols["label"].append(r["label"])
    prov = {"id": [r["id"] for r in rows], "theme": [r["sprite"].theme for r in rows],
            "element": [r["sprite"].element for r in rows], "sound": [r["sprite"].sound for r in rows],
            "english": [r["english"] for r in rows], "audio_language": [r["audio_language"] for r in rows],
            "audio_file": [str(r["audio_file"]) for r in rows],
            "text_language": [r["text_language"] for r in rows],
            "missing": [r["missing"] for r in rows]}
    kw: dict[str, Any] = {"compression": "zstd", "compression_level": 3, "row_group_size": ROW_GROUP_ROWS,
                          "use_dictionary": ["split", "label"], "write_statistics": True}
    pq.write_table(pa.table(cols, schema=RECORD_SCHEMA()), root / f"{split}.parquet", **kw)
    kw["use_dictionary"] = True
    pq.write_table(pa.table(prov), root / "_provenance" / f"{split}.parquet", **kw)
    log.info("%s: %d rows written", split, len(rows))


__all__ = ["NAME", "FREEDICT_LANGUAGES", "build_ktuberling", "is_ktuberling_build"]
