"""Format parsers: a JSONL or CSV manifest's bytes, or a Parquet file's Arrow batches -> RAW_SCHEMA tables
(mmfusion.data.schema). A bad line or value rejects only its own row (its "error" column says why); a file
that cannot be parsed at all is a DataError. No Ray and no torch here.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Collection, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mmfusion.batch import MEDIA, MODALITIES
from mmfusion.data.labels import label_key
from mmfusion.data.schema import RAW_SCHEMA, SPLIT_ALIASES, SourceFile
from mmfusion.errors import DataError
from mmfusion.storage import filesystem, read_bytes


def open_parquet(location: str) -> pq.ParquetFile:
    try:
        fs, inner = filesystem(location)
        return pq.ParquetFile(fs.open_input_file(inner))
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"cannot read Parquet file {location}: {e}") from None


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
        label = label_key(obj.get(self.label_column))
        if label is not None and _utf8_problem(label):
            errs.append(f"label: {_utf8_problem(label)}")
            label = None
        c["label"].append(label)
        rid = obj.get("id")
        no_id = rid is None or (isinstance(rid, str) and (rid == "" or bool(_utf8_problem(rid))))
        c["id"].append(f"{self.source.name}:{row}" if no_id else str(rid))
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


def parse_jsonl(data: bytes, source: SourceFile, label_column: str, keep: Collection[str]) -> pa.Table:
    rows = _Rows(source, label_column, keep)
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    n = 0
    for lineno, line in enumerate(data.split(b"\n"), start=1):
        line = line.strip()
        if not line:
            continue
        # surrogateescape: a non-UTF-8 byte survives into the string, and only the field holding it is
        # rejected
        try:
            obj = json.loads(line.decode("utf-8", errors="surrogateescape"))
        except (ValueError, RecursionError) as e:  # JSONDecodeError; an int over 4,300 digits; deep nesting
            why = e.msg if isinstance(e, json.JSONDecodeError) else str(e).split(";")[0][:120]
            rows.add(n, None, f"record: line {lineno} is not valid JSON ({why})")
        else:
            if isinstance(obj, dict):
                rows.add(n, obj)
            else:
                rows.add(n, None, f"record: line {lineno} is not a JSON object")
        n += 1
    return rows.table()


def parse_csv(data: bytes, source: SourceFile, label_column: str, keep: Collection[str]) -> pa.Table:
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
            rows.add(n, None, f"record: CSV line {reader.line_num} has {len(fields)} fields, "
                              f"the header has {len(header)}")
        else:
            rows.add(n, {h: (f if f != "" else None) for h, f in zip(header, fields, strict=True)})
        n += 1
    return rows.table()


def _media_from_arrow(col: pa.ChunkedArray, name: str, source: str) -> tuple[pa.Array, pa.Array]:
    """A Parquet image/audio column -> (bytes, refs).
    binary = bytes, string = paths, struct{bytes, path} = both."""
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
        paths = pc.struct_field(s, "path").cast(pa.string())
        refs = pc.if_else(pc.is_null(data), paths, pa.scalar(None, pa.string()))
        return data, refs
    raise DataError(f"{source}: column {name!r} has type {t}; "
                    "expected binary (encoded bytes) or string (path/URI)")


def parquet_table(tb: pa.Table, source: SourceFile, row0: int, label_column: str) -> pa.Table:
    n = tb.num_rows
    names = set(tb.column_names)
    errors = [""] * n
    cols: dict[str, Any] = {}
    for m in MEDIA:
        if m in names:
            cols[m], cols[f"{m}_ref"] = _media_from_arrow(tb[m], m, source.location)
        else:
            cols[m], cols[f"{m}_ref"] = pa.nulls(n, pa.binary()), pa.nulls(n, pa.string())
    cols["text"] = (_text_from_arrow(tb["text"], errors, source.location) if "text" in names
                    else pa.nulls(n, pa.string()))
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
    elif pa.types.is_binary(t) or pa.types.is_large_binary(t):  # value by value: one bad text, one reject
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
        return pa.array([label_key(v) for v in col.to_pylist()], pa.string())
    if pa.types.is_boolean(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t):
        vals = [label_key(v) for v in col.to_pylist()]  # bytes are decoded as UTF-8 (errors replaced)
        return pa.array(vals, pa.string())
    return pc.cast(col, pa.string()).combine_chunks()


def parse_manifest(src: SourceFile, label_column: str, keep: Collection[str], data: bytes | None = None,
                   ) -> pa.Table:
    """A JSONL or CSV manifest (its `data` when already read) -> one RAW_SCHEMA table."""
    if data is None:
        try:
            data = read_bytes(src.location)
        except OSError as e:
            raise DataError(f"cannot read {src.location}: {e}") from None
    return (parse_jsonl if src.format == "jsonl" else parse_csv)(data, src, label_column, keep)


def manifest_columns(data: bytes, fmt: str, label_column: str) -> set[str]:
    if fmt == "csv":
        stream = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8-sig", errors="replace", newline="")
        first = stream.readline()
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
    out = {c for c in (*MODALITIES, "id", "split") if c in names}
    return out | ({"label"} if label_column in names else set())
