"""KTuberling, the second built-in dataset: the plan (from the Debian packages' files, no rendering) and
a tiny build (schema, RGBA sprites, varied audio, missing fields, determinism, output-folder errors, inspect).

Needs the Debian packages in the Makefile's APT_PACKAGES (`make sysdeps`); the tiny build takes a few seconds.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from PIL import Image

from mmfusion.datasets import ktuberling as kt
from mmfusion.datasets.ktuberling import sources
from mmfusion.errors import DataError

SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def src() -> sources.Sources:
    return sources.load_sources()


@pytest.fixture(scope="module")
def small_plan(src: sources.Sources) -> dict[str, list[dict]]:
    rng = np.random.default_rng([0, 7])
    return kt._plan(src, kt._split_sprites(src, rng, "small"), rng, "small")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return kt.build_ktuberling(tmp_path_factory.mktemp("kt") / "tiny", seed=0, variant="tiny")


def _rows(root: Path, split: str) -> list[dict]:
    return pq.read_table(root / f"{split}.parquet").to_pylist()


# -------------------------------------------------------------------------------------- plan (no rendering)


def test_sources_are_real_and_heterogeneous(src: sources.Sources) -> None:
    assert len(src.sprites) > 400 and len({s.theme for s in src.sprites}) == 10
    langs = Counter(lang for rec in src.recordings.values() for lang in rec)
    assert {"en", "de", "ru", "uk", "fr", "ca"} <= set(langs)  # Latin and Cyrillic speakers
    assert "sr" in langs and not any("@" in lang for lang in langs)  # sr@latin etc. are copies of sr: once
    assert src.packages["ktuberling-data"] and all(len(h) == 64 for h in src.files.values())
    assert any(any("а" <= ch <= "я" for ch in s) for g in src.glosses.values() for s in g.get("ru", []))


def test_english_names() -> None:
    assert sources.english_name("egypt_palmtree") == "palm tree"
    assert sources.english_name("tux-apple") == "apple"
    assert sources.english_name("sherif-tux") == "sheriff"
    assert sources.english_name("robot_workshop_arm") == "arm"


def test_plan_splits_by_sprite_and_holds_out_text_languages(small_plan: dict[str, list[dict]]) -> None:
    sprites = {s: {r["sprite"] for r in rows} for s, rows in small_plan.items()}
    assert not sprites["train"] & sprites["test"] and not sprites["train"] & sprites["val"]
    assert not sprites["val"] & sprites["test"]
    text_langs = {s: {r["text_language"] for r in rows} - {None} for s, rows in small_plan.items()}
    assert text_langs["test"] == {"it", "sr"} and not text_langs["test"] & text_langs["train"]
    for split, rows in small_plan.items():  # every class in every split
        assert len({r["label"] for r in rows}) == 9, split


def test_plan_is_imbalanced_and_has_missing_fields(small_plan: dict[str, list[dict]]) -> None:
    counts = Counter(r["label"] for r in small_plan["train"])
    assert 2000 < sum(counts.values()) < 4000
    assert max(counts.values()) / sum(counts.values()) > 0.25  # the potato themes
    assert max(counts.values()) / min(counts.values()) > 10
    for split, rows in small_plan.items():
        missing = Counter(r["missing"] for r in rows)
        assert missing["image"] > 0 and missing["audio"] > 0, split
    assert sum(r["text"] is None for r in small_plan["test"]) > 0  # names the held-out dictionaries lack


def test_plan_is_seeded(src: sources.Sources, small_plan: dict[str, list[dict]]) -> None:
    rng = np.random.default_rng([0, 7])
    again = kt._plan(src, kt._split_sprites(src, rng, "small"), rng, "small")
    assert again == small_plan
    rng = np.random.default_rng([1, 7])
    other = kt._plan(src, kt._split_sprites(src, rng, "small"), rng, "small")
    assert [r["sprite"] for r in other["test"]] != [r["sprite"] for r in small_plan["test"]]


# ------------------------------------------------------------------------------------------------ tiny build


def test_schema_and_card(tiny: Path) -> None:
    assert sorted(p.name for p in tiny.iterdir()) == ["_provenance", "data_card.json", "test.parquet",
                                                      "train.parquet", "val.parquet"]
    for split in SPLITS:
        table = pq.read_table(tiny / f"{split}.parquet")
        assert table.schema.names == ["id", "split", "image", "text", "audio", "label"]
        assert set(table.column("split").to_pylist()) == {split}
        assert table.num_rows == pq.read_table(tiny / "_provenance" / f"{split}.parquet").num_rows
    card = json.loads((tiny / "data_card.json").read_text())
    assert card["name"] == "ktuberling" and card["seed"] == 0 and card["variant"] == "tiny"
    assert set(card["sources"]["debian_packages"]) >= {"ktuberling-data", "librsvg2-bin"}
    assert card["splits"]["train"]["rows"] == len(_rows(tiny, "train"))
    assert set(card["files"]) == {"train.parquet", "val.parquet", "test.parquet", "_provenance/train.parquet",
                                  "_provenance/val.parquet", "_provenance/test.parquet"}


def test_images_are_rgba_with_transparency_and_varied_sizes(tiny: Path) -> None:
    sizes = set()
    for split in SPLITS:
        for r in _rows(tiny, split):
            if r["image"] is None:
                continue
            im = Image.open(io.BytesIO(r["image"]))
            assert im.format == "PNG" and im.mode == "RGBA"
            alpha = np.asarray(im)[..., 3]
            assert alpha.max() > 0  # something visible
            sizes.add(im.size)
    assert len(sizes) > 10 and min(max(s) for s in sizes) >= 8 and max(max(s) for s in sizes) <= 400
    transparent = [r for r in _rows(tiny, "train") if r["image"] is not None
                   and np.asarray(Image.open(io.BytesIO(r["image"])))[..., 3].min() == 0]
    assert transparent  # transparent backgrounds


def test_audio_is_real_recordings_with_varied_formats(tiny: Path) -> None:
    rates, channels = Counter(), Counter()
    for split in SPLITS:
        for r in _rows(tiny, split):
            if r["audio"] is not None:
                info = sf.info(io.BytesIO(r["audio"]))
                rates[info.samplerate] += 1
                channels[info.channels] += 1
                assert 0.1 < info.duration < 10
    assert len(rates) >= 2 and set(rates) <= {8000, 22050, 44100, 48000}


def test_missing_fields_and_labels(tiny: Path) -> None:
    rows = [r for s in SPLITS for r in _rows(tiny, s)]
    assert any(r[m] is None for r in rows for m in ("image", "text", "audio"))
    assert all(any(r[m] is not None for m in ("image", "text", "audio")) for r in rows)
    assert {r["label"] for r in rows} == set(kt.LABELS.values())


def test_same_seed_same_bytes_and_rebuild_in_place(tiny: Path, tmp_path: Path) -> None:
    again = kt.build_ktuberling(tmp_path / "again", seed=0, variant="tiny")
    for p in sorted(tiny.rglob("*")):
        if p.is_file():
            assert p.read_bytes() == (again / p.relative_to(tiny)).read_bytes(), p.name
    kt.build_ktuberling(again, seed=1, variant="tiny")  # a previous build is replaced
    assert json.loads((again / "data_card.json").read_text())["seed"] == 1
    assert (again / "train.parquet").read_bytes() != (tiny / "train.parquet").read_bytes()
    assert not list(tmp_path.glob(".again.*"))  # no temp folders left behind


def test_bad_output_folder_and_arguments(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="not a folder"):
        kt.build_ktuberling(tmp_path / "file")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(DataError, match="not empty"):
        kt.build_ktuberling(tmp_path / "other")
    with pytest.raises(DataError, match="variant"):
        kt.build_ktuberling(tmp_path / "x", variant="large")
    with pytest.raises(DataError, match="seed"):
        kt.build_ktuberling(tmp_path / "x", seed=-1)
    assert (tmp_path / "other" / "keep.txt").read_text() == "x"


def test_missing_debian_package_is_named() -> None:
    with pytest.raises(DataError, match="no-such-package-mmfusion"):
        sources.package_files("no-such-package-mmfusion")


def test_cli_accepts_ktuberling() -> None:
    from mmfusion.cli import build_parser

    args = build_parser().parse_args(["data", "build", "ktuberling", "--out", "x", "--variant", "tiny"])
    assert args.name == "ktuberling" and args.variant == "tiny"


def test_inspect_reads_every_row(tiny: Path) -> None:
    from mmfusion.data.inspect import inspect_dataset

    report = inspect_dataset(str(tiny))
    assert "rejects  0" in report, report
