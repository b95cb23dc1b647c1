"""The record contract: what "bring your own dataset" means, as Arrow schemas. No Ray and no torch here.

A dataset is Parquet, or a JSONL/CSV manifest, with the columns
    image  encoded PNG/JPEG bytes (Parquet binary), or a path/URI (string)
    text   string (a Parquet binary column is decoded as UTF-8 value by value)
    audio  encoded WAV/FLAC/OGG bytes, or a path/URI
    label  string or int (any column name: label_column); normalized by mmfusion.data.labels.label_key
    id, split   optional
A Hugging Face `datasets` export (an image/audio struct {bytes, path}) is read too. A null or absent column
is a missing modality. Relative paths resolve against the folder of the file that names them; absolute
paths are local; URIs (s3://, gs://, file://, ...) go through pyarrow filesystems (mmfusion.storage).

Every reader returns tables of RAW_SCHEMA: one row per record, with "source" (the file) and "row" (the
record's index in that file) for the rejects file, and "error": "" for a readable row, else
"<modality>: <reason>" (a non-UTF-8 text, a line that is not JSON, a missing media file). Loading the media
a row names turns it into RECORD_SCHEMA (mmfusion.data.readers.resolve_media).
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "dev": "val", "test": "test", "testing": "test"}

RAW_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("split", pa.string()),
    ("image", pa.binary()),
    ("image_ref", pa.string()),  # path/URI still to be loaded by resolve_media
    ("text", pa.string()),
    ("audio", pa.binary()),
    ("audio_ref", pa.string()),
    ("label", pa.string()),
    ("error", pa.string()),  # "" = readable; else "<modality>: <reason>"
    ("source", pa.string()),  # file the record came from
    ("row", pa.int64()),  # index of the record in that file
])
RECORD_SCHEMA = pa.schema([f for f in RAW_SCHEMA if not f.name.endswith("_ref")])


@dataclass(frozen=True)
class SourceFile:
    """One data file of a dataset."""

    location: str  # absolute local path or URI
    name: str  # path relative to the dataset root (used in default ids)
    format: str  # parquet | jsonl | csv
    split: str | None  # from the file or folder name; None = from a split column, else "train"
