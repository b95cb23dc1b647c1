"""The record contract: find a dataset's files, read them into one table schema, resolve media paths, and
write rejects. No Ray and no torch here: Ray Data calls these functions from its read tasks (pipeline.py),
and `mmfusion data inspect` calls them directly.

A dataset is Parquet, or a JSONL/CSV manifest, with the columns
    image  encoded PNG/JPEG bytes (Parquet binary), or a path/URI (string)
    text   string (a Parquet binary column is decoded as UTF-8 value by value)
    audio  encoded WAV/FLAC/OGG bytes, or a path/URI
    label  string or int (any column name: label_column)
    id, split   optional
A Hugging Face `datasets` export (an image/audio struct {bytes, path}) is read too. A null or absent column is a
missing modality. Relative paths resolve against the folder of the file that names them; absolute paths are
local; URIs (s3://, gs://, file://, ...) go through pyarrow filesystems.

Splits: a folder with train/val/test files (`train.parquet`, `val.jsonl`, `test-00000-of-00002.parquet`, or
`train/`, `val/` subfolders), else a `split` column, else one manifest whose rows are all "train".

Every reader returns tables of RAW_SCHEMA: one row per record, with "source" (the file) and "row" (the record's
index in that file) for the rejects file, and "error": "" for a readable row, else "<modality>: <reason>" (a
non-UTF-8 text, a line that is not JSON, a missing media file). A bad line rejects only its own row.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import posixpath
import re
from collections import Counter
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mmfusion.errors import DataError

log = logging.getLogger(__name__)

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}
SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "dev": "val", "test": "test", "testing": "test"}
MEDIA = ("image", "audio")
CONTENT = ("image", "text", "audio")
REJECTS_NAME = "rejects.jsonl"
BATCH_ROWS = 512  # rows per table yielded by the readers (bounded memory with inline media bytes)

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


# ------------------------------------------------------------------------------------ filesystems


def is_uri(path: str) -> bool:
    return len(urlparse(path).scheme) > 1  # "C:\\data" has a one-letter scheme and is a path


def _local(path: str) -> str | None:
    """A local path for a plain path or a file:// URI; None for remote URIs."""
    if not is_uri(path):
        return os.path.abspath(os.path.expanduser(path))
    u = urlparse(path)
    return unquote(u.path) if u.scheme == "file" else None


_FS_CACHE: dict[str, pafs.FileSystem] = {}


def filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a local path or a URI."""
    local = _local(location)
    if local is not None:
        return pafs.LocalFileSystem(), local
    u = urlparse(location)
    key = f"{u.scheme}://{u.netloc}"
    fs = _FS_CACHE.get(key)
    try:
        if fs is None or u.scheme not in ("s3", "gs", "gcs"):
            fs, inner = pafs.FileSystem.from_uri(location)
            _FS_CACHE[key] = fs
            return fs, inner
        return fs, u.netloc + unquote(u.path)  # s3://bucket/key -> "bucket/key"
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
        raise DataError(f"cannot open {location}: {e}") from None


def _child(parent_location: str, parent_inner: str, child_inner: str) -> str:
    """Rebuild a location for a listed child of a (local or remote) folder."""
    if _local(parent_location) is not None:
        return child_inner
    prefix = parent_location[: len(parent_location) - len(parent_inner.rstrip("/"))] if parent_location.rstrip(
        "/").endswith(parent_inner.rstrip("/")) else f"{urlparse(parent_location).scheme}://"
    return prefix + child_inner


def read_bytes(location: str) -> bytes:
    """The bytes of a local file or URI. FileNotFoundError / OSError propagate."""
    local = _local(location)
    if local is not None:
        with open(local, "rb") as f:
            return f.read()
    fs, inner = filesystem(location)
    with fs.open_input_stream(inner) as f:
        return f.read()


def resolve_ref(ref: str, source: str) -> str:
    """A path/URI from a record -> a location: URIs and absolute paths as they are, relative ones against the
    folder of `source` (the manifest or Parquet file that names them)."""
    if is_uri(ref) or os.path.isabs(ref):
        return ref
    if is_uri(source):
        base, _, _ = source.rpartition("/")
        u = urlparse(base)
        return u._replace(path=posixpath.normpath(posixpath.join(u.path or "/", ref))).geturl()
    return os.path.normpath(os.path.join(os.path.dirname(source), ref))


# -------------------------------------------------------------------------------------- discovery


@dataclass(frozen=True)
class SourceFile:
    location: str  # absolute local path or URI
    name: str  # path relative to the dataset root (used in default ids)
    format: str  # parquet | jsonl | csv
    split: str | None  # from the file or folder name; None = from a split column, else "train"


def _format_of(name: str) -> str | None:
    return FORMATS.get(os.path.splitext(name)[1].lower())


def _is_rejects(name: str) -> bool:
    return name == REJECTS_NAME or name.endswith(".rejects.jsonl")


def _split_of_stem(stem: str) -> str | None:
    """train -> train; validation-00000-of-00002 -> val; train_part1 -> train; trainset -> None."""
    m = re.match(r"([a-zA-Z]+)(?:[-_.].*)?$", stem)
    return SPLIT_ALIASES.get(m.group(1).lower()) if m else None


def discover(path: str) -> list[SourceFile]:
    """The data files of a dataset folder or a single manifest, with splits from their names where given."""
    fs, inner = filesystem(path)
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"dataset not found: {path}")
    location = inner if _local(path) is not None else path
    if info.type == pafs.FileType.File:
        fmt = _format_of(inner)
        if fmt is None:
            raise DataError(f"{path}: unsupported file type (expected one of {', '.join(sorted(FORMATS))})")
        return [SourceFile(location, posixpath.basename(inner), fmt, None)]

    by_split: dict[str, list[SourceFile]] = {}
    loose: list[SourceFile] = []
    for entry in sorted(fs.get_file_info(pafs.FileSelector(inner)), key=lambda e: e.base_name):
        name = entry.base_name
        if name.startswith((".", "_")):
            continue
        if entry.type == pafs.FileType.File:
            fmt = _format_of(name)
            if fmt is None or _is_rejects(name):
                continue
            sf = SourceFile(_child(path, inner, entry.path), name, fmt, _split_of_stem(os.path.splitext(name)[0]))
            (by_split.setdefault(sf.split, []) if sf.split else loose).append(sf)
        elif entry.type == pafs.FileType.Directory and name.lower() in SPLIT_ALIASES:
            split = SPLIT_ALIASES[name.lower()]
            for sub in sorted(fs.get_file_info(pafs.FileSelector(entry.path, recursive=True)), key=lambda e: e.path):
                fmt = _format_of(sub.base_name)
                if sub.type == pafs.FileType.File and fmt and not _is_rejects(sub.base_name) \
                        and not sub.base_name.startswith((".", "_")):
                    rel = posixpath.relpath(sub.path, inner)
                    by_split.setdefault(split, []).append(SourceFile(_child(path, inner, sub.path), rel, fmt, split))
    if by_split:
        if loose:
            log.warning("%s: ignoring %s (not named after a split)", path, ", ".join(s.name for s in loose))
        order = {s: i for i, s in enumerate(SPLITS)}
        return [f for s in sorted(by_split, key=lambda s: (order.get(s, 99), s)) for f in by_split[s]]
    if loose:
        return loose
    raise DataError(f"no Parquet, JSONL or CSV files in {path} (expected train/val/test files or one manifest)")


# ---------------------------------------------------------------------------------------- units


@dataclass(frozen=True)
class ReadUnit:
    """One independent piece of reading: a Parquet row group, or a whole JSONL/CSV manifest."""

    source: SourceFile
    row_group: int  # Parquet row group; -1 for JSONL/CSV
    row_offset: int  # index (in its file) of the unit's first record
    num_rows: int = -1  # JSONL/CSV: records in this unit (-1 = to the end of the file)

    def as_row(self) -> dict[str, Any]:  # flat, for ray.data.from_items
        s = self.source
        return {"location": s.location, "name": s.name, "format": s.format, "file_split": s.split,
                "row_group": self.row_group, "row_offset": self.row_offset, "num_rows": self.num_rows}

    @staticmethod
    def from_row(r: Mapping[str, Any]) -> ReadUnit:
        split = r["file_split"]
        src = SourceFile(str(r["location"]), str(r["name"]), str(r["format"]), None if split is None else str(split))
        return ReadUnit(src, int(r["row_group"]), int(r["row_offset"]), int(r["num_rows"]))


def _open_parquet(location: str) -> pq.ParquetFile:
    try:
        fs, inner = filesystem(location)
        return pq.ParquetFile(fs.open_input_file(inner))
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"cannot read Parquet file {location}: {e}") from None


def plan_units(files: Iterable[SourceFile], manifest_rows: int | None = None) -> list[ReadUnit]:
    """Parquet: one unit per row group. JSONL/CSV: the whole file, or `manifest_rows` records per unit so that
    loading the files a long manifest names is spread over several read tasks."""
    units = []
    for sf in files:
        if sf.format != "parquet":
            if manifest_rows is None:
                units.append(ReadUnit(sf, -1, 0))
                continue
            n = _parse_manifest(sf, "label", ()).num_rows
            units += [ReadUnit(sf, -1, a, min(manifest_rows, n - a)) for a in range(0, max(n, 1), manifest_rows)]
            continue
        md = _open_parquet(sf.location).metadata
        offset = 0
        for rg in range(md.num_row_groups):
            units.append(ReadUnit(sf, rg, offset))
            offset += md.row_group(rg).num_rows
    return units


# -------------------------------------------------------------------------------------- readers


def _utf8_problem(s: str) -> str | None:
    """Why a str (decoded with surrogateescape) is not valid UTF-8, or None."""
    try:
        s.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        ch = ord(s[e.start])
        byte = f"byte 0x{ch - 0xDC00:02x}" if 0xDC80 <= ch <= 0xDCFF else "an unpaired surrogate"
        return f"not valid UTF-8 ({byte} at character {e.start})"


def _bytes_utf8(raw: bytes) -> tuple[str | None, str | None]:
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as e:
        return None, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at position {e.start})"


def _label_str(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() else (None if v != v else repr(v))
    return str(v)


class _Rows:
    """Column builder for RAW_SCHEMA, one record at a time (JSONL/CSV) or column-wise (Parquet)."""

    def __init__(self, source: SourceFile, label_column: str, keep: Collection[str]) -> None:
        self.source, self.label_column, self.keep = source, label_column, keep
        self.cols: dict[str, list[Any]] = {f.name: [] for f in RAW_SCHEMA}

    def add(self, row: int, obj: Mapping[str, Any] | None, error: str = "") -> None:
        c, errs = self.cols, [error] if error else []
        obj = obj or {}
        for m in MEDIA:
            v = obj.get(m) if m in self.keep else None
            data = ref = None
            if isinstance(v, str) and v != "":
                problem = _utf8_problem(v)
                if problem:
                    errs.append(f"{m}: path {problem}")
                else:
                    ref = v
            elif v not in (None, ""):
                errs.append(f"{m}: expected a path or URI string, got {type(v).__name__}")
            c[m].append(data)
            c[f"{m}_ref"].append(ref)
        text = obj.get("text") if "text" in self.keep else None
        if isinstance(text, str):
            problem = _utf8_problem(text)
            if problem:
                errs.append(f"text: {problem}")
                text = None
        elif isinstance(text, (int, float)) and not isinstance(text, bool):
            text = str(text)
        elif text is not None:
            errs.append(f"text: expected a string, got {type(text).__name__}")
            text = None
        c["text"].append(text or None)  # "" is a missing text (CSV cannot tell empty from null)
        label = _label_str(obj.get(self.label_column))
        if label is not None and _utf8_problem(label):
            errs.append(f"label: {_utf8_problem(label)}")
            label = None
        c["label"].append(label)
        rid = obj.get("id")
        rid = None if rid is None or (isinstance(rid, str) and (rid == "" or _utf8_problem(rid))) else str(rid)
        c["id"].append(rid or f"{self.source.name}:{row}")
        c["split"].append(self._split(obj.get("split")))
        c["error"].append(errs[0] if errs else "")
        c["source"].append(self.source.location)
        c["row"].append(row)

    def _split(self, v: Any) -> str:
        if self.source.split:
            return self.source.split
        if v is None or v == "" or not isinstance(v, str) or _utf8_problem(v):
            return "train"
        return SPLIT_ALIASES.get(v.strip().lower(), v.strip().lower())

    def table(self) -> pa.Table:
        return pa.Table.from_pydict(self.cols, schema=RAW_SCHEMA)


def _parse_jsonl(data: bytes, source: SourceFile, label_column: str, keep: Collection[str]) -> pa.Table:
    rows = _Rows(source, label_column, keep)
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    n = 0
    for lineno, line in enumerate(data.split(b"\n"), start=1):
        line = line.strip()
        if not line:
            continue
        # surrogateescape: a non-UTF-8 byte survives into the string, and only the field holding it is rejected
        try:
            obj = json.loads(line.decode("utf-8", errors="surrogateescape"))
        except json.JSONDecodeError as e:
            rows.add(n, None, f"record: line {lineno} is not valid JSON ({e.msg})")
        else:
            if isinstance(obj, dict):
                rows.add(n, obj)
            else:
                rows.add(n, None, f"record: line {lineno} is not a JSON object")
        n += 1
    return rows.table()


def _parse_csv(data: bytes, source: SourceFile, label_column: str, keep: Collection[str]) -> pa.Table:
    rows = _Rows(source, label_column, keep)
    stream = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8-sig", errors="surrogateescape", newline="")
    reader = csv.reader(stream)
    try:
        header = next(reader)
    except StopIteration:
        return rows.table()
    except csv.Error as e:
        raise DataError(f"{source.location}: cannot parse the CSV header ({e})") from None
    if any(_utf8_problem(h) for h in header):
        raise DataError(f"{source.location}: the CSV header is not valid UTF-8")
    header = [h.strip() for h in header]
    n = 0
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            rows.add(n, None, f"record: CSV line {reader.line_num} cannot be parsed ({e})")
            n += 1
            continue
        if not fields or fields == [""]:
            continue  # blank line
        if len(fields) != len(header):
            rows.add(n, None, f"record: CSV line {reader.line_num} has {len(fields)} fields, the header has {len(header)}")
        else:
            rows.add(n, {h: (f if f != "" else None) for h, f in zip(header, fields, strict=True)})
        n += 1
    return rows.table()


def _media_from_arrow(col: pa.ChunkedArray, name: str, source: str) -> tuple[pa.Array, pa.Array]:
    """A Parquet image/audio column -> (bytes, refs). binary = bytes, string = paths, struct{bytes,path} = both."""
    t = col.type
    if pa.types.is_dictionary(t):
        col, t = col.cast(t.value_type), t.value_type
    n = len(col)
    if pa.types.is_null(t):
        return pa.nulls(n, pa.binary()), pa.nulls(n, pa.string())
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        return col.cast(pa.binary()).combine_chunks(), pa.nulls(n, pa.string())
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        refs = col.cast(pa.string()).combine_chunks()
        refs = pc.if_else(pc.equal(refs, ""), pa.scalar(None, pa.string()), refs)  # "" = missing
        return pa.nulls(n, pa.binary()), refs
    if pa.types.is_struct(t) and {"bytes", "path"} <= {t.field(i).name for i in range(t.num_fields)}:
        s = col.combine_chunks()
        data = pc.struct_field(s, "bytes").cast(pa.binary())
        refs = pc.if_else(pc.is_null(data), pc.struct_field(s, "path").cast(pa.string()), pa.scalar(None, pa.string()))
        return data, refs
    raise DataError(f"{source}: column {name!r} has type {t}; expected binary (encoded bytes) or string (path/URI)")


def _parquet_table(tb: pa.Table, source: SourceFile, row0: int, label_column: str) -> pa.Table:
    n = tb.num_rows
    names = set(tb.column_names)
    errors = [""] * n
    cols: dict[str, Any] = {}
    for m in MEDIA:
        if m in names:
            cols[m], cols[f"{m}_ref"] = _media_from_arrow(tb[m], m, source.location)
        else:
            cols[m], cols[f"{m}_ref"] = pa.nulls(n, pa.binary()), pa.nulls(n, pa.string())
    cols["text"] = _text_from_arrow(tb["text"], errors, source.location) if "text" in names else pa.nulls(n, pa.string())
    cols["label"] = _label_from_arrow(tb[label_column]) if label_column in names else pa.nulls(n, pa.string())
    rows = pa.array(range(row0, row0 + n), pa.int64())
    default_ids = pa.array([f"{source.name}:{r}" for r in range(row0, row0 + n)], pa.string())
    if "id" in names and not pa.types.is_null(tb["id"].type):
        ids = pc.cast(tb["id"], pa.string()).combine_chunks()
        cols["id"] = pc.if_else(pc.is_null(ids), default_ids, ids)
    else:
        cols["id"] = default_ids
    if source.split:
        cols["split"] = pa.array([source.split] * n, pa.string())
    elif "split" in names and not pa.types.is_null(tb["split"].type):
        raw = pc.utf8_lower(pc.utf8_trim_whitespace(pc.cast(tb["split"], pa.string()))).to_pylist()
        cols["split"] = pa.array([SPLIT_ALIASES.get(s, s) if s else "train" for s in raw], pa.string())
    else:
        cols["split"] = pa.array(["train"] * n, pa.string())
    cols["error"] = pa.array(errors, pa.string())
    cols["source"] = pa.array([source.location] * n, pa.string())
    cols["row"] = rows
    return pa.table({f.name: cols[f.name] for f in RAW_SCHEMA}, schema=RAW_SCHEMA)


def _text_from_arrow(col: pa.ChunkedArray, errors: list[str], source: str) -> pa.Array:
    t = col.type
    if pa.types.is_dictionary(t):
        col, t = col.cast(t.value_type), t.value_type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        out = col.cast(pa.string()).combine_chunks()
    elif pa.types.is_binary(t) or pa.types.is_large_binary(t):  # decode value by value: one bad text, one reject
        values = []
        for i, raw in enumerate(col.cast(pa.binary()).to_pylist()):
            text, problem = (None, None) if raw is None else _bytes_utf8(raw)
            if problem:
                errors[i] = errors[i] or f"text: {problem}"
            values.append(text)
        out = pa.array(values, pa.string())
    elif pa.types.is_null(t) or pa.types.is_integer(t) or pa.types.is_floating(t):
        out = col.cast(pa.string()).combine_chunks()
    else:
        raise DataError(f"{source}: column 'text' has type {t}; expected string")
    return pc.if_else(pc.equal(out, ""), pa.scalar(None, pa.string()), out)


def _label_from_arrow(col: pa.ChunkedArray) -> pa.Array:
    t = col.type
    if pa.types.is_dictionary(t):
        col, t = col.cast(t.value_type), t.value_type
    if pa.types.is_floating(t):
        return pa.array([_label_str(v) for v in col.to_pylist()], pa.string())
    if pa.types.is_boolean(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t):
        vals = [_label_str(v.decode("utf-8", errors="replace") if isinstance(v, bytes) else v) for v in col.to_pylist()]
        return pa.array(vals, pa.string())
    return pc.cast(col, pa.string()).combine_chunks()


def read_unit(unit: ReadUnit, label_column: str = "label", splits: Collection[str] | None = None,
              modalities: Collection[str] = CONTENT, batch_rows: int = BATCH_ROWS) -> Iterator[pa.Table]:
    """Read one unit -> RAW_SCHEMA tables (media refs not yet loaded), keeping only rows of `splits`."""
    src = unit.source
    if src.split is not None and splits is not None and src.split not in splits:
        return
    if src.format == "parquet":
        pf = _open_parquet(src.location)
        wanted = {"id", "split", label_column, *modalities}
        columns = [c for c in pf.schema_arrow.names if c in wanted]
        row = unit.row_offset
        try:
            batches = pf.iter_batches(batch_size=batch_rows, row_groups=[unit.row_group], columns=columns)
            for rb in batches:
                tb = _parquet_table(pa.Table.from_batches([rb]), src, row, label_column)
                row += rb.num_rows
                yield _keep_splits(tb, splits)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"cannot read Parquet file {src.location}: {e}") from None
        return
    tb = _parse_manifest(src, label_column, set(modalities))
    if unit.num_rows >= 0 or unit.row_offset:
        tb = tb.slice(unit.row_offset, unit.num_rows if unit.num_rows >= 0 else None)
    tb = _keep_splits(tb, splits)
    for start in range(0, max(tb.num_rows, 1), batch_rows):
        yield tb.slice(start, batch_rows)


def _parse_manifest(src: SourceFile, label_column: str, keep: Collection[str]) -> pa.Table:
    try:
        data = read_bytes(src.location)
    except OSError as e:
        raise DataError(f"cannot read {src.location}: {e}") from None
    return (_parse_jsonl if src.format == "jsonl" else _parse_csv)(data, src, label_column, keep)


def _keep_splits(tb: pa.Table, splits: Collection[str] | None) -> pa.Table:
    if splits is None:
        return tb
    return tb.filter(pc.is_in(tb["split"], value_set=pa.array(sorted(splits), pa.string())))


def resolve_media(tb: pa.Table) -> pa.Table:
    """Load image_ref/audio_ref into image/audio bytes; a missing or unreadable file rejects its row.
    RAW_SCHEMA -> RECORD_SCHEMA."""
    errors = tb["error"].to_pylist()
    sources = tb["source"].to_pylist()
    cols = {name: tb[name] for name in RECORD_SCHEMA.names}
    for m in MEDIA:
        refs = tb[f"{m}_ref"].to_pylist()
        if not any(r is not None for r in refs):
            continue
        data = tb[m].to_pylist()
        for i, ref in enumerate(refs):
            if ref is None or errors[i]:
                continue
            location = resolve_ref(ref, sources[i])
            try:
                data[i] = read_bytes(location)
            except FileNotFoundError:
                errors[i] = f"{m}: file not found: {location}"
            except IsADirectoryError:
                errors[i] = f"{m}: is a directory, not a file: {location}"
            except (OSError, DataError) as e:
                errors[i] = f"{m}: cannot read {location} ({e})"
        cols[m] = pa.array(data, pa.binary())
    cols["error"] = pa.array(errors, pa.string())
    return pa.table(cols, schema=RECORD_SCHEMA)


# ---------------------------------------------------------------------------------------- tables


def iter_records(path: str, split: str | Collection[str] | None = None, label_column: str = "label",
                 modalities: Collection[str] = CONTENT, batch_rows: int = BATCH_ROWS) -> Iterator[pa.Table]:
    """Stream a dataset as RECORD_SCHEMA tables (media loaded), without Ray."""
    splits = {split} if isinstance(split, str) else (set(split) if split is not None else None)
    for unit in plan_units(discover(path)):
        for tb in read_unit(unit, label_column, splits, modalities, batch_rows):
            if tb.num_rows:
                yield resolve_media(tb)


def read_records(path: str, split: str | None = None, label_column: str = "label") -> pa.Table:
    """The whole dataset (or one split) as one RECORD_SCHEMA table. For small data and tests; see iter_records."""
    tables = list(iter_records(path, split, label_column))
    return pa.concat_tables(tables) if tables else RECORD_SCHEMA.empty_table()


def sort_labels(values: Iterable[str | None]) -> list[str]:
    """Sorted unique labels: numerically when every label is an integer, else as strings."""
    uniq = {v for v in values if v is not None}
    if uniq and all(re.fullmatch(r"[+-]?\d+", v) for v in uniq):
        return sorted(uniq, key=lambda v: (int(v), v))
    return sorted(uniq)


@dataclass
class DatasetSummary:
    files: list[SourceFile]
    columns: set[str]  # canonical columns present in at least one file: image, text, audio, label, id, split
    rows: dict[str, int]  # records per split
    labels: list[str] | None  # sorted unique train labels (all rows if there is no train split); None: no label column


def summarize(path: str, label_column: str = "label") -> DatasetSummary:
    """Columns, rows per split and labels, reading only the label and split columns of Parquet files."""
    files = discover(path)
    columns: set[str] = set()
    rows: Counter[str] = Counter()
    labels_by_split: dict[str, set[str]] = {}

    def note(split_col: list[str], label_col: list[str | None]) -> None:
        rows.update(split_col)
        for s, lab in zip(split_col, label_col, strict=True):
            if lab is not None:
                labels_by_split.setdefault(s, set()).add(lab)

    for sf in files:
        if sf.format == "parquet":
            pf = _open_parquet(sf.location)
            names = pf.schema_arrow.names
            columns |= {c for c in (*CONTENT, "id", "split") if c in names}
            if label_column in names:
                columns.add("label")
            want = [c for c in (label_column, "split") if c in names and not (c == "split" and sf.split)]
            tb = pf.read(columns=want) if want else None
            n = pf.metadata.num_rows
            t = _parquet_table(tb if tb is not None else pa.table({"_": pa.nulls(n)}), sf, 0, label_column)
            note(t["split"].to_pylist(), t["label"].to_pylist())
        else:
            data = read_bytes(sf.location)
            t = (_parse_jsonl if sf.format == "jsonl" else _parse_csv)(data, sf, label_column, CONTENT)
            columns |= _manifest_columns(data, sf.format, label_column)
            note(t["split"].to_pylist(), t["label"].to_pylist())
    labels = None
    if "label" in columns:
        pool = labels_by_split.get("train") or set().union(set(), *labels_by_split.values())
        labels = sort_labels(pool)
    return DatasetSummary(files, columns, dict(rows), labels)


def _manifest_columns(data: bytes, fmt: str, label_column: str) -> set[str]:
    if fmt == "csv":
        first = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8-sig", errors="replace", newline="").readline()
        names = {h.strip() for h in next(csv.reader([first]), [])}
    else:
        names = set()
        for line in data.split(b"\n"):
            try:
                obj = json.loads(line.decode("utf-8", errors="surrogateescape")) if line.strip() else None
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                names |= set(obj)
    out = {c for c in (*CONTENT, "id", "split") if c in names}
    return out | ({"label"} if label_column in names else set())


# ---------------------------------------------------------------------------------------- rejects


def default_rejects_path(data_path: str, rejects_path: str | None = None) -> Path:
    """Configured path, else <dataset folder>/rejects.jsonl, else <manifest>.rejects.jsonl beside the manifest.
    Rejects are always written locally; for a remote dataset the default is ./<name>.rejects.jsonl."""
    if rejects_path:
        if is_uri(rejects_path) and _local(rejects_path) is None:
            raise DataError(f"data.rejects_path must be a local path, got {rejects_path}")
        return Path(_local(rejects_path) or rejects_path)
    local = _local(data_path)
    if local is None:
        name = posixpath.basename(urlparse(data_path).path.rstrip("/")) or "dataset"
        return Path.cwd() / f"{os.path.splitext(name)[0]}.rejects.jsonl"
    p = Path(local)
    return p / REJECTS_NAME if p.is_dir() else p.with_name(p.stem + ".rejects.jsonl")


def split_error(error: str) -> tuple[str, str]:
    """'audio: empty (0 bytes)' -> ('audio', 'empty (0 bytes)')."""
    modality, sep, reason = error.partition(": ")
    return (modality, reason) if sep else ("record", error)


def write_rejects(path: Path, rows: Iterable[Mapping[str, Any]]) -> int:
    """Write rejected rows (id, split, row, source, error) as JSONL: id, split, row, source, modality, reason.
    Sorted by source and row; replaces the file atomically. Returns the number written."""
    recs = []
    for r in rows:
        modality, reason = split_error(str(r["error"]))
        recs.append({"id": r.get("id"), "split": r.get("split"), "row": None if r.get("row") is None else int(r["row"]),
                     "source": r.get("source"), "modality": modality, "reason": reason})
    recs.sort(key=lambda r: (str(r["source"]), r["row"] if r["row"] is not None else -1, str(r["id"])))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in recs:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return len(recs)


def update_rejects(path: Path, rows: list[Mapping[str, Any]]) -> Path | None:
    """Write the rejects file, or remove a stale one when nothing was rejected. Returns the path or None."""
    try:
        if not rows:
            path.unlink(missing_ok=True)  # an old file would describe rows that are no longer bad
            return None
        write_rejects(path, rows)
    except OSError as e:
        raise DataError(f"cannot write the rejects file {path} ({e}); set data.rejects_path") from None
    return path


def check_bad_fraction(num_bad: int, num_rows: int, max_bad_fraction: float, rejects_path: Path | None) -> float:
    """The share of rejected rows; DataError (naming it, the threshold and the rejects file) above the threshold."""
    fraction = num_bad / num_rows if num_rows else 0.0
    if fraction > max_bad_fraction:
        raise DataError(
            f"{num_bad} of {num_rows} rows ({fraction:.1%}) could not be decoded, above data.max_bad_fraction="
            f"{max_bad_fraction:g}; the reasons are in the rejects file {rejects_path}"
        )
    return fraction


def read_rejects(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
