"""`mmfusion init`: the data profile measures what the rough data holds, and the starter config it writes
validates and carries its reasons."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from tests.rough_data import write_rough_dataset

from mmfusion.config import load_config
from mmfusion.data.profile import dominant_script, format_profile, profile_dataset
from mmfusion.errors import ConfigError, DataError
from mmfusion.starter_config import starter_config, write_starter_config


@pytest.fixture(scope="module")
def rough(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_rough_dataset(tmp_path_factory.mktemp("rough"), n=60)


def test_profile_measures_rough_edges(rough: Path) -> None:
    p = profile_dataset(str(rough))
    assert p.scanned_split == "train" and p.scanned == p.rows["train"] == 42
    assert {"RGBA", "L", "P"} <= set(p.image.modes)
    assert 40 <= min(p.image.widths) and max(p.image.widths) < 200
    assert p.image.alpha >= p.image.modes["RGBA"]
    assert set(p.audio.rates) == {44100, 22050} and set(p.audio.channels) == {1, 2}
    assert 0.3 <= min(p.audio.seconds) and max(p.audio.seconds) <= 4.0
    assert set(p.text.scripts) == {"LATIN", "CYRILLIC"}
    assert p.share("image") == 1.0 and p.share("text") < 1.0 and p.share("audio") < 1.0
    assert p.class_counts["bird"] > p.class_counts["cat"] and p.imbalance > 2
    report = format_profile(p)
    assert "with alpha" in report and "44100 Hz" in report and "CYRILLIC" in report


def test_dominant_script() -> None:
    assert dominant_script("красная птица") == "CYRILLIC"
    assert dominant_script("a red bird") == "LATIN"
    assert dominant_script("123 !") == "none"


def test_starter_config_derives_values_from_statistics(rough: Path) -> None:
    p = profile_dataset(str(rough))
    text = starter_config(p, data_path=str(rough))
    raw = yaml.safe_load(text)
    data = raw["data"]
    assert data["modalities"] == ["image", "text", "audio"]
    assert data["image"]["channels"] == 3  # RGBA and palette images: colour matters
    assert 40 <= data["image"]["size"] <= 64
    assert all(0.0 < m < 1.0 for m in data["image"]["mean"]) and len(data["image"]["std"]) == 3
    assert data["audio"]["sample_rate"] == 16000  # the clips are 22-44 kHz
    assert data["audio"]["max_seconds"] in (3.5, 4.0)  # the 95th percentile of 0.3-4 s, rounded up to 0.5 s
    assert data["text"]["max_length"] >= 24  # Cyrillic captions are two UTF-8 bytes a letter
    assert raw["optim"]["class_weights"] == "balanced"  # 6:3:1
    assert "95th percentile clip length" in text and "median short side" in text
    assert "largest/smallest class" in text


def test_write_starter_config_validates_and_refuses_to_overwrite(rough: Path, tmp_path: Path) -> None:
    out = write_starter_config(str(rough), tmp_path / "exp.yaml")
    cfg = load_config(out)
    assert cfg.data.path == str(rough)
    with pytest.raises(ConfigError, match="exists"):
        write_starter_config(str(rough), out)
    write_starter_config(str(rough), out, force=True)


def test_init_on_missing_data_names_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nowhere"):
        write_starter_config(str(tmp_path / "nowhere"), tmp_path / "exp.yaml")
    assert not (tmp_path / "exp.yaml").exists()


def test_init_on_data_without_media_names_the_problem(tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(f'{{"text": null, "label": "{c}"}}\n' for c in "abab"), encoding="utf-8")
    with pytest.raises(DataError, match="image|text|audio"):
        write_starter_config(str(manifest), tmp_path / "exp.yaml")
    assert not (tmp_path / "exp.yaml").exists()


def test_data_inspect_prints_the_init_statistics(rough: Path) -> None:
    from mmfusion.data.inspect import inspect_dataset

    report = inspect_dataset(str(rough))
    assert "statistics over 42 train rows" in report and "44100 Hz" in report and "CYRILLIC" in report
