"""Readers: find a dataset's files, plan them into independent read units, read those into RAW_SCHEMA tables
and load the media they name (-> RECORD_SCHEMA, mmfusion.data.schema), and summarize a dataset cheaply.
Ray Data calls `read_unit` and `resolve_media` from its read tasks (mmfusion.data.pipeline); `mmfusion data
inspect`, evaluation and the tests call `iter_records` / `read_records` directly. No Ray and no torch here.

Splits: a folder with train/val/test files (`train.parquet`, `val.jsonl`, `test-00000-of-00002.parquet`, or
`train/`, `val/` subfolders), else a `split` column, else one manifest whose rows are all "train".
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
from collections import Counter
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from mmfusion.batch import MEDIA, MODALITIES
from mmfusion.data.labels import sort_labels
from mmfusion.data.parsers import manifest_columns, open_parquet, parquet_table, parse_manifest
from mmfusion.data.rejects import is_rejects_file
from mmfusion.data.schema import RECORD_SCHEMA, SPLIT_ALIASES, SPLITS, SourceFile
from mmfusion.errors import DataError
from mmfusion.storage import filesystem, is_uri, local_path, read_bytes

log = logging.getLogger(__name__)

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}
BATCH_ROWS = 512  # rows per table yielded by the readers (bounded memory with inline media bytes)


def _child(parent_location: str, parent_inner: str, child_inner: str) -> str:
    """Rebuild a location for a listed child of a (local or remote) folder."""
    if local_path(parent_location) is not None:
        return child_inner
    inner = parent_inner.rstrip("/")
    if parent_location.rstrip("/").endswith(inner):
        prefix = parent_location[: len(parent_location) - len(inner)]
    else:
        prefix = f"{urlparse(parent_location).scheme}://"
    return prefix + child_inner


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


# ---------------------------------------------------------------------------------------- discovery


def _format_of(name: str) -> str | None:
    return FORMATS.get(os.path.splitext(name)[1].lower())


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
    location = inner if local_path(path) is not None else path
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
            if fmt is None or is_rejects_file(name):
                continue
            split = _split_of_stem(os.path.splitext(name)[0])
            sf = SourceFile(_child(path, inner, entry.path), name, fmt, split)
            (by_split.setdefault(sf.split, []) if sf.split else loose).append(sf)
        elif entry.type == pafs.FileType.Directory and name.lower() in SPLIT_ALIASES:
            split = SPLIT_ALIASES[name.lower()]
            listing = fs.get_file_info(pafs.FileSelector(entry.path, recursive=True))
            for sub in sorted(listing, key=lambda e: e.path):
                fmt = _format_of(sub.base_name)
                if sub.type == pafs.FileType.File and fmt and not is_rejects_file(sub.base_name) \
                        and not sub.base_name.startswith((".", "_")):
                    rel = posixpath.relpath(sub.path, inner)
                    sf = SourceFile(_child(path, inner, sub.path), rel, fmt, split)
                    by_split.setdefault(split, []).append(sf)
    if by_split:
        if loose:
            log.warning("%s: ignoring %s (not named after a split)", path, ", ".join(s.name for s in loose))
        order = {s: i for i, s in enumerate(SPLITS)}
        return [f for s in sorted(by_split, key=lambda s: (order.get(s, 99), s)) for f in by_split[s]]
    if loose:
        return loose
    raise DataError(f"no Parquet, JSONL or CSV files in {path} "
                    "(expected train/val/test files or one manifest)")


# -------------------------------------------------------------------------------------------- units


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
        src = SourceFile(str(r["location"]), str(r["name"]), str(r["format"]),
                         None if split is None else str(split))
        return ReadUnit(src, int(r["row_group"]), int(r["row_offset"]), int(r["num_rows"]))


def plan_units(files: Iterable[SourceFile], manifest_rows: int | None = None) -> list[ReadUnit]:
    """Parquet: one unit per row group. JSONL/CSV: the whole file, or `manifest_rows` records per unit so that
    loading the files a long manifest names is spread over several read tasks."""
    units = []
    for sf in files:
        if sf.format != "parquet":
            if manifest_rows is None:
                units.append(ReadUnit(sf, -1, 0))
                continue
            n = parse_manifest(sf, "label", ()).num_rows
            units += [ReadUnit(sf, -1, a, min(manifest_rows, n - a))
                      for a in range(0, max(n, 1), manifest_rows)]
            continue
        md = open_parquet(sf.location).metadata
        offset = 0
        for rg in range(md.num_row_groups):
            units.append(ReadUnit(sf, rg, offset))
            offset += md.row_group(rg).num_rows
    return units


# ------------------------------------------------------------------------------------------ reading


def read_unit(unit: ReadUnit, label_column: str = "label", splits: Collection[str] | None = None,
              modalities: Collection[str] = MODALITIES, batch_rows: int = BATCH_ROWS) -> Iterator[pa.Table]:
    """Read one unit -> RAW_SCHEMA tables (media refs not yet loaded), keeping only rows of `splits`."""
    src = unit.source
    if src.split is not None and splits is not None and src.split not in splits:
        return
    if src.format == "parquet":
        pf = open_parquet(src.location)
        wanted = {"id", "split", label_column, *modalities}
        columns = [c for c in pf.schema_arrow.names if c in wanted]
        row = unit.row_offset
        try:
            batches = pf.iter_batches(batch_size=batch_rows, row_groups=[unit.row_group], columns=columns)
            for rb in batches:
                tb = parquet_table(pa.Table.from_batches([rb]), src, row, label_column)
                row += rb.num_rows
                yield _keep_splits(tb, splits)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"cannot read Parquet file {src.location}: {e}") from None
        return
    tb = parse_manifest(src, label_column, set(modalities))
    if unit.num_rows >= 0 or unit.row_offset:
        tb = tb.slice(unit.row_offset, unit.num_rows if unit.num_rows >= 0 else None)
    tb = _keep_splits(tb, splits)
    for start in range(0, max(tb.num_rows, 1), batch_rows):
        yield tb.slice(start, batch_rows)


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


# ------------------------------------------------------------------------------------------- tables


def iter_records(path: str, split: str | Collection[str] | None = None, label_column: str = "label",
                 modalities: Collection[str] = MODALITIES, batch_rows: int = BATCH_ROWS,
                 ) -> Iterator[pa.Table]:
    """Stream a dataset as RECORD_SCHEMA tables (media loaded), without Ray."""
    splits = {split} if isinstance(split, str) else (set(split) if split is not None else None)
    for unit in plan_units(discover(path)):
        for tb in read_unit(unit, label_column, splits, modalities, batch_rows):
            if tb.num_rows:
                yield resolve_media(tb)


def read_records(path: str, split: str | None = None, label_column: str = "label") -> pa.Table:
    """The whole dataset (or one split) as one RECORD_SCHEMA table. For small data and tests
    (see iter_records)."""
    tables = list(iter_records(path, split, label_column))
    return pa.concat_tables(tables) if tables else RECORD_SCHEMA.empty_table()


@dataclass
class DatasetSummary:
    files: list[SourceFile]
    columns: set[str]  # canonical columns present in at least one file: image, text, audio, label, id, split
    rows: dict[str, int]  # records per split
    # sorted unique train labels (all rows if there is no train split); None: no label column
    labels: list[str] | None


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
            pf = open_parquet(sf.location)
            names = pf.schema_arrow.names
            columns |= {c for c in (*MODALITIES, "id", "split") if c in names}
            if label_column in names:
                columns.add("label")
            want = [c for c in (label_column, "split") if c in names and not (c == "split" and sf.split)]
            tb = pf.read(columns=want) if want else None
            n = pf.metadata.num_rows
            t = parquet_table(tb if tb is not None else pa.table({"_": pa.nulls(n)}), sf, 0, label_column)
            note(t["split"].to_pylist(), t["label"].to_pylist())
        else:
            data = read_bytes(sf.location)
            t = parse_manifest(sf, label_column, MODALITIES, data)
            columns |= manifest_columns(data, sf.format, label_column)
            note(t["split"].to_pylist(), t["label"].to_pylist())
    labels = None
    if "label" in columns:
        pool = labels_by_split.get("train") or set().union(set(), *labels_by_split.values())
        labels = sort_labels(pool)
    return DatasetSummary(files, columns, dict(rows), labels)
