"""The data pipeline's decisions without Ray (mmfusion.data.plan): data.cache auto, the preprocessing pool's
size, the one pass of row statistics (rejects, val carve-out, class counts, the audio-statistics sample)
and the id-hash selections the pipeline applies to record tables."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from mmfusion.batch import InputSpec
from mmfusion.data import plan
from mmfusion.data.plan import choose_cache, estimated_row_bytes, preprocess_actors

MIB = 1024 ** 2


def test_row_bytes_count_images_as_uint8():
    image = InputSpec(modalities=("image",), image_shape=(3, 224, 224))
    assert estimated_row_bytes(image) == plan.ROW_OVERHEAD_BYTES + 3 * 224 * 224  # 1 byte per pixel
    full = InputSpec(modalities=("image", "text", "audio"), image_shape=(1, 28, 28), max_text_len=32,
                     audio_shape=(1, 40, 101))
    assert estimated_row_bytes(full) == plan.ROW_OVERHEAD_BYTES + 784 + 2 * 8 * 32 + 4 * 40 * 101


def test_cache_auto_picks_memory_when_the_data_fits_and_streams_otherwise():
    mode, why = choose_cache("auto", 10 * MIB, 400 * MIB)
    assert mode == "memory" and "data.cache=auto chose memory" in why and "~10.0 MiB" in why
    mode, why = choose_cache("auto", 300 * MIB, 400 * MIB)
    assert mode == "none" and "streaming every epoch" in why and "400 MiB" in why
    edge = int(plan.AUTO_MEMORY_SHARE * 400 * MIB)
    assert choose_cache("auto", edge, 400 * MIB)[0] == "memory"
    assert choose_cache("auto", edge + 1, 400 * MIB)[0] == "none"


def test_stream_budget_depends_on_the_row_size_never_the_row_count():
    full = InputSpec(modalities=("image", "text", "audio"), image_shape=(1, 28, 28), max_text_len=32,
                     audio_shape=(1, 40, 101))
    budget = plan.stream_store_bytes(full, 512)
    assert budget == plan.STREAM_BLOCKS * 512 * estimated_row_bytes(full)  # AVT-Digits: ~70 MiB, 8 blocks
    image = InputSpec(modalities=("image",), image_shape=(3, 224, 224))
    assert plan.stream_store_bytes(image, 512) == plan.STREAM_BLOCKS * 512 * estimated_row_bytes(image)
    tiny = InputSpec(modalities=("text",), max_text_len=8)
    assert plan.stream_store_bytes(tiny, 512) == plan.STREAM_MIN_BYTES  # small rows: the floor


def test_cache_memory_and_none_are_taken_as_given():
    assert choose_cache("memory", 10_000 * MIB, 400 * MIB)[0] == "memory"  # spills, but the user asked
    assert choose_cache("none", 1 * MIB, 400 * MIB)[0] == "none"
    with pytest.raises(ValueError, match="data.cache must be auto, memory or none"):
        choose_cache("disk", 1, 1)


def test_pool_uses_the_cpus_training_leaves_free_not_the_row_count():
    rows = 3800  # the real dataset of issue 15, where one actor per 4,096 rows left a core idle
    assert preprocess_actors(2, 0, rows) == 2  # materialized before training: both cores
    assert preprocess_actors(2, 1, rows) == 1  # streaming beside a 1-CPU training worker: the free one
    assert preprocess_actors(2, 0.5, rows) == 1  # half a CPU left is not an actor (they take 1 CPU)
    assert preprocess_actors(16, 4, 1_000_000) == 12
    assert preprocess_actors(2, 2, rows) == 1  # never none: Ray Data queues it until a CPU frees up
    assert preprocess_actors(8, 0, 100) == 1  # a few rows: one actor, not eight start-ups for one block
    assert preprocess_actors(8, 0, 3 * plan.MIN_ROWS_PER_ACTOR) == 3


def batch(ids, splits, labels, errors, source="m.jsonl"):
    n = len(ids)
    return {"id": np.array(ids, dtype=object), "split": np.array(splits, dtype=object),
            "source": np.array([source] * n, dtype=object), "row": np.arange(n, dtype=np.int64),
            "label": np.array(labels, dtype=np.int64), "error": np.array(errors, dtype=object)}


def test_row_stats_count_rejects_skips_and_classes():
    stats = plan.RowStats("record: none")
    stats.add(batch(["a", "b", "c", "d"], ["train"] * 3 + ["test"], [0, 1, -1, 1],
                    ["", "", "image: truncated", ""]))
    stats.add(batch(["e", "f"], ["train", "train"], [1, -1], ["", "record: none of the configured ..."]))
    out = stats.finish(seed=0, val_fraction=None, num_classes=3)
    assert out.num_rows == 6 and out.empty == 1 and out.threshold == -1
    assert out.bad == [{"id": "c", "split": "train", "source": "m.jsonl", "row": 2,
                        "error": "image: truncated"}]
    assert out.rows == {"train": 3, "val": 0, "test": 1}
    assert out.class_counts == [1, 2, 0]  # train rows only (a, b, e)


def test_row_stats_carve_val_out_of_train_by_id_hash():
    ids = [f"r{i}" for i in range(40)]
    stats = plan.RowStats("record: none")
    for lo in range(0, 40, 16):  # batches of any size: the carve-out depends on the ids only
        part = ids[lo:lo + 16]
        stats.add(batch(part, ["train"] * len(part), [i % 2 for i in range(lo, lo + len(part))],
                        [""] * len(part)))
    out = stats.finish(seed=7, val_fraction=0.25, num_classes=2)
    assert out.rows == {"train": 30, "val": 10, "test": 0}
    hashes = plan.id_hash(ids, 7)
    to_val = hashes <= np.uint64(out.threshold)
    assert to_val.sum() == 10  # the rows plan.carve_val moves in the pipeline, before or after preprocessing
    assert out.class_counts == np.bincount(np.arange(40)[~to_val] % 2).tolist()
    again = plan.RowStats("record: none")
    again.add(batch(ids[::-1], ["train"] * 40, [i % 2 for i in range(40)][::-1], [""] * 40))
    assert again.finish(seed=7, val_fraction=0.25, num_classes=2).threshold == out.threshold  # order-free
    other = plan.RowStats("record: none")
    other.add(batch(ids, ["train"] * 40, [0] * 40, [""] * 40))
    assert other.finish(seed=8, val_fraction=0.25, num_classes=2).threshold != out.threshold


def test_val_threshold_keeps_a_row_on_each_side():
    h = plan.id_hash(["a", "b"], 0)
    assert (h <= np.uint64(plan.val_threshold(h, 0.01))).sum() == 1  # rounds to 0 rows: still one in val
    assert (h <= np.uint64(plan.val_threshold(h, 0.99))).sum() == 1  # rounds to 2: train keeps one
    assert plan.val_threshold(h, 0.0) == -1


def test_audio_stats_sample_is_seeded_order_free_and_apart_from_val():
    ids = [f"r{i}" for i in range(200)]

    def finish(order: list[str], seed: int = 7, sample_rows: int | None = 50) -> plan.SplitStats:
        stats = plan.RowStats("record: none")
        for lo in range(0, len(order), 64):
            part = order[lo:lo + 64]
            stats.add(batch(part, ["train"] * len(part), [0] * len(part), [""] * len(part)))
        return stats.finish(seed=seed, val_fraction=0.2, num_classes=1, sample_rows=sample_rows)

    out = finish(ids)
    assert out.rows["train"] == 160 and out.sample_threshold >= 0
    table = plan.carve_val(pa.table({"id": ids, "split": ["train"] * 200}), 7, out.threshold)
    train = [i for i, s in zip(ids, table["split"].to_pylist(), strict=True) if s == "train"]
    assert len(train) == 160
    # what the pipeline streams: carve, keep train, sample -> exactly sample_rows of train's rows
    sampled = plan.in_sample(table.filter(pa.array([s == "train" for s in table["split"].to_pylist()])),
                             plan.sample_key(7), out.sample_threshold)["id"].to_pylist()
    assert len(sampled) == 50 and set(sampled) <= set(train)
    # a salted hash: the sample does not follow the carve-out (val rows would be sampled as often)
    val = sorted(set(ids) - set(train))
    in_val = plan.in_sample(pa.table({"id": val}), plan.sample_key(7), out.sample_threshold).num_rows
    assert 0 < in_val < len(val)
    assert finish(ids[::-1]).sample_threshold == out.sample_threshold  # independent of the read order
    assert finish(ids, seed=8).sample_threshold != out.sample_threshold
    assert finish(ids, sample_rows=160).sample_threshold == -1  # no more rows than that: all of them
    assert finish(ids, sample_rows=None).sample_threshold == -1
    everything = pa.table({"id": ids})
    assert plan.in_sample(everything, plan.sample_key(7), -1).num_rows == 200


def test_sample_threshold_picks_exactly_that_many_rows():
    h = plan.id_hash([str(i) for i in range(1000)], plan.sample_key(0))
    for rows in (1, 17, 999):
        assert (h <= np.uint64(plan.sample_threshold(h, rows))).sum() == rows
    assert plan.sample_threshold(h, 1000) == -1
    with pytest.raises(ValueError, match="at least one row"):
        plan.sample_threshold(h, 0)
