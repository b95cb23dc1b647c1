"""Record contract readers (Parquet, JSONL, CSV), split and label discovery, rejects, and `data inspect`."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from PIL import Image

from mmfusion.data import readers, rejects, schema
from mmfusion.data.inspect import inspect_dataset
from mmfusion.data.labels import sort_labels
from mmfusion.errors import DataError


def png(value: int = 100) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(value).integers(0, 256, (24, 24), dtype=np.uint8)).save(
        buf, format="PNG")
    return buf.getvalue()


def wav(n: int = 2000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, (0.2 * np.sin(np.arange(n) / 3)).astype(np.float32), 8000, format="WAV")
    return buf.getvalue()


def write_jsonl(path: Path, rows: list[dict | bytes]) -> Path:
    lines = [r if isinstance(r, bytes) else json.dumps(r).encode() for r in rows]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def acceptance_manifest(root: Path, good: int = 6) -> Path:
    """Acceptance 3: a truncated PNG, an empty WAV, a missing file and a non-UTF-8 text among good rows."""
    media = root / "media"
    media.mkdir(parents=True)
    (media / "ok.png").write_bytes(png())
    (media / "ok.wav").write_bytes(wav())
    full = png(7)
    (media / "truncated.png").write_bytes(full[: len(full) // 2])
    (media / "empty.wav").write_bytes(b"")
    rows: list[dict | bytes] = [
        {"id": f"good{i}", "image": "media/ok.png", "text": f"row {i}", "audio": str(media / "ok.wav"),
         "label": i % 2}
        for i in range(good)
    ]
    rows += [
        {"id": "trunc", "image": "media/truncated.png", "text": "one", "label": 1},
        {"id": "emptywav", "audio": "media/empty.wav", "text": "zero", "label": 0},
        {"id": "missing", "image": "media/nope.png", "label": 0},
        b'{"id": "latin1", "text": "z\xe9ro", "label": 0}',
    ]
    return write_jsonl(root / "manifest.jsonl", rows)


# --------------------------------------------------------------------------------------------- readers


def test_parquet_bytes_columns(tmp_path: Path):
    img, aud = png(), wav()
    pq.write_table(pa.table({
        "image": pa.array([img, None, img], pa.binary()),
        "text": ["one", "two", None],
        "audio": pa.array([aud, aud, None], pa.binary()),
        "label": pa.array([1, 2, 10], pa.int64()),
    }), tmp_path / "data.parquet")
    tb = readers.read_records(str(tmp_path / "data.parquet"))
    assert tb.schema == schema.RECORD_SCHEMA
    assert tb["image"].to_pylist() == [img, None, img]
    assert tb["audio"].to_pylist() == [aud, aud, None]
    assert tb["text"].to_pylist() == ["one", "two", None]
    assert tb["label"].to_pylist() == ["1", "2", "10"]
    assert tb["split"].to_pylist() == ["train"] * 3  # a single file without a split column
    assert tb["id"].to_pylist() == ["data.parquet:0", "data.parquet:1", "data.parquet:2"]
    assert tb["row"].to_pylist() == [0, 1, 2] and set(tb["error"].to_pylist()) == {""}
    assert readers.read_records(f"file://{tmp_path}").equals(tb)  # a file:// URI names the same data


def test_parquet_path_columns_relative_and_absolute(tmp_path: Path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(png(1))
    abs_wav = tmp_path / "abs.wav"
    abs_wav.write_bytes(wav())
    sub = tmp_path / "ds"
    sub.mkdir()
    pq.write_table(pa.table({"image": ["../img/a.png", None], "audio": [str(abs_wav), f"file://{abs_wav}"],
                             "label": ["x", "y"]}), sub / "train.parquet")
    tb = readers.read_records(str(sub))
    assert tb["image"].to_pylist() == [png(1), None]  # relative to the Parquet file's folder
    assert tb["audio"].to_pylist() == [wav(), wav()]  # absolute path and file:// URI
    assert tb["text"].to_pylist() == [None, None]  # absent column = missing modality
    assert tb["error"].to_pylist() == ["", ""]


def test_parquet_binary_text_bad_utf8_rejects_only_that_row(tmp_path: Path):
    pq.write_table(pa.table({"text": pa.array([b"ok", b"caf\xe9", None], pa.binary()), "label": [0, 1, 0]}),
                   tmp_path / "t.parquet")
    tb = readers.read_records(str(tmp_path / "t.parquet"))
    assert tb["text"].to_pylist() == ["ok", None, None]
    assert tb["error"].to_pylist() == ["", "text: not valid UTF-8 (byte 0xe9 at position 3)", ""]


def test_hf_datasets_struct_columns(tmp_path: Path):
    (tmp_path / "b.png").write_bytes(png(3))
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({"image": pa.array([{"bytes": png(2), "path": None},
                                                {"bytes": None, "path": "b.png"}], struct),
                             "label": [0, 1]}), tmp_path / "train-00000-of-00001.parquet")
    tb = readers.read_records(str(tmp_path))
    assert tb["image"].to_pylist() == [png(2), png(3)]
    assert tb["split"].to_pylist() == ["train", "train"]


def test_jsonl_paths_missing_columns_and_bad_lines(tmp_path: Path):
    (tmp_path / "a.png").write_bytes(png())
    path = write_jsonl(tmp_path / "m.jsonl", [
        {"image": "a.png", "text": "hello", "label": "cat"},
        {"text": "no image here", "label": "dog"},  # absent key = missing modality
        {"image": None, "audio": None, "label": "cat", "id": 42},
        b'{"text": "caf\xe9", "label": "dog"}',  # Latin-1 byte: only this row is rejected
        b"{not json",
        b"[1, 2]",
        {"image": "gone.png", "label": "cat"},
        {"image": 5, "label": "cat"},
    ])
    tb = readers.read_records(str(path))
    assert tb.num_rows == 8 and tb["row"].to_pylist() == list(range(8))
    assert tb["image"].to_pylist()[:3] == [png(), None, None]
    assert tb["text"].to_pylist()[:3] == ["hello", "no image here", None]
    assert tb["id"].to_pylist()[2] == "42"
    errors = tb["error"].to_pylist()
    assert errors[:3] == ["", "", ""]
    assert errors[3] == "text: not valid UTF-8 (byte 0xe9 at character 3)"
    assert errors[4].startswith("record: line 5 is not valid JSON")
    assert errors[5] == "record: line 6 is not a JSON object"
    assert errors[6] == f"image: file not found: {tmp_path / 'gone.png'}"
    assert errors[7] == "image: expected a path or URI string, got int"


def test_csv_empty_fields_are_missing_and_bad_bytes_reject_one_row(tmp_path: Path):
    (tmp_path / "a.wav").write_bytes(wav())
    data = (b"id,audio,text,digit\n"
            b"r1,a.wav,\"one, with a comma\",1\n"
            b"r2,,two,2\n"
            b"r3,a.wav,caf\xe9,3\n"
            b"r4,a.wav,too,many,fields\n"
            b"\n"
            b"r5,a.wav,,10\n")
    (tmp_path / "m.csv").write_bytes(data)
    tb = readers.read_records(str(tmp_path / "m.csv"), label_column="digit")
    assert tb["id"].to_pylist() == ["r1", "r2", "r3", "m.csv:3", "r5"]
    assert tb["text"].to_pylist() == ["one, with a comma", "two", None, None, None]
    assert tb["audio"].to_pylist() == [wav(), None, None, None, wav()]
    assert tb["label"].to_pylist() == ["1", "2", "3", None, "10"]
    errors = tb["error"].to_pylist()
    assert errors[0] == errors[1] == errors[4] == ""
    assert errors[2].startswith("text: not valid UTF-8 (byte 0xe9")
    assert errors[3] == "record: CSV line 5 has 5 fields, the header has 4"


# ---------------------------------------------------------------------------------- splits and labels


def test_split_files_folder_and_split_column(tmp_path: Path):
    ds = tmp_path / "ds"
    ds.mkdir()
    pq.write_table(pa.table({"text": ["a", "b"], "label": [2, 10]}), ds / "train.parquet")
    write_jsonl(ds / "validation.jsonl", [{"text": "c", "label": 9}])
    (ds / "test").mkdir()
    pq.write_table(pa.table({"text": ["d"], "label": [1]}), ds / "test" / "part-0.parquet")
    write_jsonl(ds / "rejects.jsonl", [{"id": "x", "reason": "old"}])  # our own output: never data
    (ds / "data_card.json").write_text("{}")
    files = readers.discover(str(ds))
    assert [(f.name, f.split) for f in files] == [("train.parquet", "train"), ("validation.jsonl", "val"),
                                                   ("test/part-0.parquet", "test")]
    s = readers.summarize(str(ds))
    assert s.rows == {"train": 2, "val": 1, "test": 1}
    assert s.labels == ["2", "10"]  # train labels only, sorted numerically
    assert s.columns == {"text", "label"}
    assert readers.read_records(str(ds), split="val")["text"].to_pylist() == ["c"]

    manifest = write_jsonl(tmp_path / "one.jsonl", [{"text": "a", "label": "b", "split": "TRAIN"},
                                                     {"text": "b", "label": "a", "split": "validation"},
                                                     {"text": "c", "label": "z", "split": "test"},
                                                     {"text": "d", "label": "c"}])
    s = readers.summarize(str(manifest))
    assert s.rows == {"train": 2, "val": 1, "test": 1}
    assert s.labels == ["b", "c"]
    assert readers.read_records(str(manifest))["split"].to_pylist() == ["train", "val", "test", "train"]


def test_sort_labels():
    assert sort_labels(["10", "9", "1", None, "9"]) == ["1", "9", "10"]
    assert sort_labels(["b", "a", "10"]) == ["10", "a", "b"]


def test_missing_dataset_and_unsupported_file(tmp_path: Path):
    with pytest.raises(DataError, match="dataset not found"):
        readers.discover(str(tmp_path / "nope"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unsupported file type"):
        readers.discover(str(tmp_path / "x.txt"))
    with pytest.raises(DataError, match="no Parquet, JSONL or CSV files"):
        readers.discover(str(tmp_path))


def test_manifest_units_cover_every_row_once(tmp_path: Path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"text": str(i), "label": i} for i in range(10)])
    units = readers.plan_units(readers.discover(str(path)), manifest_rows=4)
    assert [(u.row_offset, u.num_rows) for u in units] == [(0, 4), (4, 4), (8, 2)]
    rows = [r for u in units for tb in readers.read_unit(readers.ReadUnit.from_row(u.as_row()))
            for r in tb["row"].to_pylist()]
    assert rows == list(range(10))


# -------------------------------------------------------------------------------------------- rejects


def test_rejects_writer_and_bad_fraction(tmp_path: Path):
    out = tmp_path / "r" / "rejects.jsonl"
    n = rejects.write_rejects(out, [
        {"id": "b", "split": "val", "row": 7, "source": "/d/m.jsonl", "error": "audio: empty (0 bytes)"},
        {"id": "a", "split": "train", "row": 2, "source": "/d/m.jsonl",
         "error": "record: line 3 is not valid JSON"},
    ])
    assert n == 2
    assert rejects.read_rejects(out) == [
        {"id": "a", "split": "train", "row": 2, "source": "/d/m.jsonl", "modality": "record",
         "reason": "line 3 is not valid JSON"},
        {"id": "b", "split": "val", "row": 7, "source": "/d/m.jsonl", "modality": "audio",
         "reason": "empty (0 bytes)"},
    ]
    assert rejects.check_bad_fraction(1, 100, 0.01, out) == pytest.approx(0.01)
    with pytest.raises(DataError) as e:
        rejects.check_bad_fraction(2, 100, 0.01, out)
    assert "2 of 100 rows (2.0%)" in str(e.value) and "max_bad_fraction=0.01" in str(e.value)
    assert str(out) in str(e.value)


def test_default_rejects_path(tmp_path: Path):
    (tmp_path / "m.jsonl").write_text("")
    assert rejects.default_rejects_path(str(tmp_path)) == tmp_path / "rejects.jsonl"
    assert rejects.default_rejects_path(str(tmp_path / "m.jsonl")) == tmp_path / "m.rejects.jsonl"
    assert (rejects.default_rejects_path(str(tmp_path), "elsewhere/r.jsonl")
            == Path("elsewhere/r.jsonl").absolute())
    with pytest.raises(DataError, match="must be a local path"):
        rejects.default_rejects_path(str(tmp_path), "s3://bucket/r.jsonl")


def test_acceptance3_inspect_reports_and_writes_rejects(tmp_path: Path):
    manifest = acceptance_manifest(tmp_path)
    report = inspect_dataset(str(manifest))
    rejects_file = tmp_path / "manifest.rejects.jsonl"
    rejected = {r["id"]: r for r in rejects.read_rejects(rejects_file)}
    assert set(rejected) == {"trunc", "emptywav", "missing", "latin1"}
    assert (rejected["trunc"]["modality"], rejected["emptywav"]["modality"]) == ("image", "audio")
    assert "truncated" in rejected["trunc"]["reason"]
    assert rejected["emptywav"]["reason"] == "empty (0 bytes)"
    assert rejected["missing"]["modality"] == "image"
    assert rejected["missing"]["reason"].startswith("file not found")
    assert rejected["latin1"]["modality"] == "text" and "not valid UTF-8" in rejected["latin1"]["reason"]
    assert rejected["latin1"]["row"] == 9 and rejected["latin1"]["source"] == str(manifest)
    assert "rows     10  (train 10)" in report
    assert f"rejects  4 (40.0%) -> {rejects_file}" in report
    assert "by field: audio 1, image 2, text 1" in report
    assert re.search(r"^\s+train\s+10\s+6\s+6\s+6\s+6$", report, re.M)  # rows, good, image, text, audio

    # the bad rows fixed: the report says so and the stale rejects file is removed
    write_jsonl(manifest, [{"text": "fine", "label": 1}])
    assert "rejects  0" in inspect_dataset(str(manifest)) and not rejects_file.exists()
