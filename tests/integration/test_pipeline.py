"""The Ray Data pipeline on a real local Ray cluster: acceptance 3 (bad records are set aside, good rows flow)
and acceptance 4 (AVT-Digits -> collated torch batches with the documented keys, shapes and dtypes)."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from ray.data.dataset import MaterializedDataset
from tests.unit.test_records import acceptance_manifest

from mmfusion.config import DataConfig, load_config
from mmfusion.data import pipeline, plan, rejects
from mmfusion.data.pipeline import build_datasets, iter_torch_batches
from mmfusion.errors import DataError
from mmfusion.runtime import usable_cpus

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("cache", ["memory", "none"])
def test_acceptance3_bad_rows_rejected_good_rows_flow(ray_local, tmp_path: Path, cache: str,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture):
    """Materialized (memory) and streamed (none: val carved out before preprocessing) give the same rows."""
    # + a truncated PNG, an empty WAV, a missing file, Latin-1 text
    manifest = acceptance_manifest(tmp_path, good=12)
    # the path big datasets take: several read units, blocks cut small and spread over two Preprocessor actors
    monkeypatch.setattr(plan, "MIN_ROWS_PER_ACTOR", 8)
    monkeypatch.setattr(pipeline, "PREPROCESS_BLOCK", 4)
    monkeypatch.setattr(pipeline, "MANIFEST_UNIT_ROWS", 6)
    cfg = DataConfig(path=str(manifest), max_bad_fraction=0.3, val_fraction=0.25, cache=cache)
    with caplog.at_level(logging.INFO, logger="mmfusion.data.pipeline"):
        bundle = build_datasets(cfg, seed=3, train_cpus=1)
    assert bundle.cache == cache and f"data.cache={cache}" in caplog.text
    # the machine's cores: all for the pool before training (memory), all but the 1-CPU worker's beside it
    # (none); and 16 rows in blocks of 8 at least per actor: at most 2
    actors = plan.preprocess_actors(usable_cpus(), 1 if cache == "none" else 0, 16)
    assert f"preprocessing 16 rows (train, val) with up to {actors} actor(s)" in caplog.text
    assert isinstance(bundle.train, MaterializedDataset) == (cache == "memory")

    assert (bundle.num_rows, bundle.num_rejected) == (16, 4)
    assert bundle.rejects_path == tmp_path / "manifest.rejects.jsonl"
    rejected = {r["id"]: (r["modality"], r["reason"]) for r in rejects.read_rejects(bundle.rejects_path)}
    assert rejected["trunc"][0] == "image" and "truncated" in rejected["trunc"][1]
    assert rejected["emptywav"] == ("audio", "empty (0 bytes)")
    assert rejected["missing"][0] == "image" and rejected["missing"][1].startswith("file not found")
    assert rejected["latin1"][0] == "text" and "not valid UTF-8" in rejected["latin1"][1]

    # no val split in the manifest: 25% of the 12 good train rows, by a seeded id hash
    assert (bundle.train_rows, bundle.val_rows, bundle.test) == (9, 3, None)
    assert bundle.labels == ["0", "1"]
    seen: Counter[int] = Counter()
    for ds, n in ((bundle.train, 9), (bundle.val, 3)):
        batches = list(iter_torch_batches(ds, batch_size=4, spec=bundle.spec))
        assert sum(len(b["label"]) for b in batches) == n
        for b in batches:
            assert set(b) == {"image", "text", "text_mask", "audio", "present", "label"}
            assert b["present"].all()  # every good row of this manifest has all three modalities
            seen.update(b["label"].tolist())
    assert seen == Counter({0: 6, 1: 6})


def test_too_many_bad_rows_stop_the_run(ray_local, tmp_path: Path):
    manifest = acceptance_manifest(tmp_path, good=6)
    with pytest.raises(DataError) as e:
        build_datasets(DataConfig(path=str(manifest), max_bad_fraction=0.1))
    msg = str(e.value)
    assert "4 of 10 rows (40.0%)" in msg and "max_bad_fraction=0.1" in msg
    assert str(tmp_path / "manifest.rejects.jsonl") in msg
    assert len(rejects.read_rejects(tmp_path / "manifest.rejects.jsonl")) == 4


def test_configured_modality_absent_from_the_data(tmp_path: Path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"text": "one", "label": 1}\n')
    with pytest.raises(DataError, match="data.modalities includes 'image', 'audio' but the dataset .* has no "
                                        "image or audio column"):
        build_datasets(DataConfig(path=str(path)))
    with pytest.raises(DataError, match="has no 'test' rows"):
        build_datasets(DataConfig(path=str(path), modalities=["text"]), splits=("train", "test"))


def test_acceptance4_avt_digits_collated_batches(ray_local, avt_tiny: Path):
    cfg = load_config(REPO / "jobs" / "configs" / "avt_digits.yaml", [f"data.path={avt_tiny}"]).data
    bundle = build_datasets(cfg, splits=("train", "val", "test"))
    spec = bundle.spec
    assert spec.modalities == ("image", "text", "audio")
    assert bundle.labels == [str(d) for d in range(10)]
    assert bundle.num_rows == bundle.train_rows + bundle.val_rows + bundle.test_rows + bundle.num_rejected
    assert min(bundle.train_rows, bundle.val_rows, bundle.test_rows) > 0

    missing = Counter()
    for name, ds, n in (("train", bundle.train, bundle.train_rows), ("val", bundle.val, bundle.val_rows),
                        ("test", bundle.test, bundle.test_rows)):
        rows = 0
        for b in iter_torch_batches(ds, batch_size=64, spec=spec,
                                    shuffle_seed=0 if name == "train" else None):
            B = len(b["label"])
            rows += B
            assert b["image"].shape == (B, *spec.image_shape) and b["image"].dtype == torch.float32
            assert b["text"].shape == (B, spec.max_text_len) and b["text"].dtype == torch.int64
            assert b["text_mask"].shape == (B, spec.max_text_len) and b["text_mask"].dtype == torch.int64
            assert b["audio"].shape == (B, *spec.audio_shape) and b["audio"].dtype == torch.float32
            assert b["present"].shape == (B, 3) and b["present"].dtype == torch.bool
            assert b["label"].dtype == torch.int64 and 0 <= b["label"].min() and b["label"].max() <= 9
            assert b["present"].any(dim=1).all()  # every row has at least one modality
            assert torch.isfinite(b["image"]).all() and torch.isfinite(b["audio"]).all()
            for j, key in enumerate(("image", "text", "audio")):
                absent = ~b["present"][:, j]
                missing[key] += int(absent.sum())
                assert (b[key][absent] == 0).all()  # a missing modality is zeros
                assert (b[key][~absent].flatten(1) != 0).any(dim=1).all()  # a present one is not
            assert ((b["text_mask"] == 1) == (b["text"] != spec.pad_id)).all()
        assert rows == n, name
    assert sum(missing.values()) > 0  # the tiny build has rows with a missing modality, and they flow through


def test_audio_standardized_with_train_statistics(ray_local, avt_tiny: Path):
    from mmfusion.data.preprocessor import Preprocessor
    from mmfusion.data.readers import read_records

    cfg = load_config(REPO / "jobs" / "configs" / "avt_digits.yaml", [f"data.path={avt_tiny}"]).data
    assert cfg.audio.stats is None and cfg.audio.normalize == "per_bin"
    bundle = build_datasets(cfg, splits=("train", "test"))
    stats = cfg.audio.stats  # measured on train, written into the config the artifact will keep
    assert stats is not None and len(stats.mean) == len(stats.std) == bundle.spec.audio_shape[1]
    j = bundle.spec.modalities.index("audio")

    def present_audio(ds) -> np.ndarray:  # (n, 1, F, T) of the rows that have audio
        rows = [b["audio"][b["present"][:, j]] for b in ds.iter_batches(batch_size=256, batch_format="numpy")]
        return np.concatenate(rows)

    train = present_audio(bundle.train)
    np.testing.assert_allclose(train.mean(axis=(0, 1, 3)), 0.0, atol=1e-3)  # per feature bin
    std = train.std(axis=(0, 1, 3))
    np.testing.assert_allclose(std[np.array(stats.std) > 0.1], 1.0, atol=1e-2)

    # one transform: the Preprocessor built from the config (as evaluation and serving build it) gives the
    # test split exactly as the pipeline standardized it
    records = read_records(str(avt_tiny), "test")
    out = Preprocessor(cfg, labels=bundle.labels)({k: np.array(records[k].to_pylist(), dtype=object)
                                                   for k in records.column_names})
    offline = np.sort(out["audio"][out["present"][:, j] & (out["error"] == "")].sum(axis=(1, 2, 3)))
    piped = np.sort(present_audio(bundle.test).sum(axis=(1, 2, 3)))
    np.testing.assert_allclose(offline, piped, rtol=1e-5, atol=1e-3)



def test_cache_none_streams_the_same_rows_as_memory(ray_local, avt_tiny: Path):
    """Same rows, labels, class counts and (after the collate step) the same tensors either way."""
    cfg = load_config(REPO / "jobs" / "configs" / "avt_digits.yaml", [f"data.path={avt_tiny}"]).data

    def build(cache: str) -> tuple[tuple, dict[str, np.ndarray]]:
        data = cfg.model_copy(update={"cache": cache}, deep=True)
        bundle = build_datasets(data, splits=("train", "val"))
        val = next(iter(iter_torch_batches(bundle.val, batch_size=10_000, spec=bundle.spec)))
        val = {k: v.numpy() for k, v in val.items()}
        keys = [b"".join(val[k][i].tobytes() for k in ("label", "text", "image"))
                for i in range(len(val["label"]))]
        order = sorted(range(len(keys)), key=keys.__getitem__)  # rows come in any order
        counts = (bundle.train_rows, bundle.val_rows, tuple(bundle.class_counts), data.audio.stats)
        return counts, {k: v[order] for k, v in val.items()}

    (*mem_counts, mem_stats), mem = build("memory")
    (*none_counts, none_stats), streamed = build("none")
    assert mem_counts == none_counts and mem_counts[1] > 0
    np.testing.assert_allclose(none_stats.mean, mem_stats.mean, rtol=1e-6)  # the same train rows measured
    for k in mem:
        np.testing.assert_allclose(streamed[k], mem[k], atol=1e-5, err_msg=k)


def test_cache_none_fits_audio_stats_on_a_seeded_sample(ray_local, avt_tiny: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture):
    """Streamed data with more train rows than plan.AUDIO_STATS_ROWS: the audio mean/std are those of an
    id-hash sample of that many good train rows (chosen before preprocessing), the same for the same seed and
    close to the exact ones; materialized data (memory) keeps the exact statistics."""
    from mmfusion.data.audio import audio_moments, fit_stats
    from mmfusion.data.preprocessor import Preprocessor
    from mmfusion.data.readers import read_records

    cfg = load_config(REPO / "jobs" / "configs" / "avt_digits.yaml",
                      [f"data.path={avt_tiny}", "data.modalities=[audio]"]).data
    records = read_records(str(avt_tiny), "train")  # the offline reference: every train row, preprocessed
    out = Preprocessor(cfg, labels=[str(d) for d in range(10)])(
        {k: np.array(records[k].to_pylist(), dtype=object) for k in records.column_names})
    good = out["error"] == ""  # audio only: a row without audio is skipped, so every good row has audio
    ids, audio = out["id"][good].astype(str), out["audio"][good]
    frames = audio.shape[-1]
    cap = len(ids) // 3
    monkeypatch.setattr(plan, "AUDIO_STATS_ROWS", cap)

    def offline(rows: np.ndarray):  # the statistics of these rows, as the pipeline fits them
        m = audio_moments({"audio": audio[rows], "present": np.ones((int(rows.sum()), 1), bool)}, 0)
        return fit_stats(int(m["count"][0]), m["sums"][0], m["squares"][0], cfg.audio.normalize)

    def build(cache: str, seed: int):
        data = cfg.model_copy(update={"cache": cache}, deep=True)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="mmfusion.data.pipeline"):
            bundle = build_datasets(data, splits=("train",), seed=seed)
        assert bundle.train_rows == len(ids)
        return data.audio.stats

    hashes = plan.id_hash(ids.tolist(), plan.sample_key(1))
    sampled = hashes <= np.uint64(plan.sample_threshold(hashes, cap))
    assert sampled.sum() == cap
    first = build("none", seed=1)
    assert f"audio statistics from a sample of {cap} of {len(ids)} train rows" in caplog.text
    assert f"preprocessing {cap} rows (train)" in caplog.text
    assert f"with the mean/std of {cap * frames} train frames" in caplog.text  # the sampled rows' frames only
    expected, exact = offline(sampled), offline(np.ones(len(ids), bool))
    np.testing.assert_allclose(first.mean, expected.mean, rtol=1e-5)
    np.testing.assert_allclose(first.std, expected.std, rtol=1e-4)
    # close to every row's statistics (65 of 197 clips here: within 0.04 std per bin; each bin's mean and std
    # within 0.15 std, the looser bound for other builds of the tiny data), but not them
    assert np.max(np.abs(np.subtract(first.mean, exact.mean)) / exact.std) < 0.15
    assert np.max(np.abs(np.subtract(first.std, exact.std)) / exact.std) < 0.15
    assert first != exact
    assert build("none", seed=1) == first  # reproducible for a seed, whatever the block order
    hashes2 = plan.id_hash(ids.tolist(), plan.sample_key(2))
    assert not np.array_equal(hashes2 <= np.uint64(plan.sample_threshold(hashes2, cap)), sampled)
    memory = build("memory", seed=1)  # rows already materialized: the exact statistics
    assert f"audio statistics from all {len(ids)} train rows" in caplog.text
    np.testing.assert_allclose(memory.mean, exact.mean, rtol=1e-5)
    np.testing.assert_allclose(memory.std, exact.std, rtol=1e-4)


def test_global_shuffle_reorders_train_every_epoch(ray_local, avt_tiny: Path):
    cfg = load_config(REPO / "jobs" / "configs" / "avt_digits.yaml",
                      [f"data.path={avt_tiny}", "data.shuffle=global", "data.modalities=[text]"]).data
    bundle = build_datasets(cfg, splits=("train",), seed=5)

    def epoch() -> list[tuple[int, ...]]:
        return [tuple(r) for b in bundle.train.iter_batches(batch_size=None, batch_format="numpy")
                for r in b["text"].tolist()]

    first, second = epoch(), epoch()
    assert len(first) == bundle.train_rows and sorted(first) == sorted(second)  # the same rows
    assert first != second  # in a new order
