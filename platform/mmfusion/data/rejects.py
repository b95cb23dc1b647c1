"""Rejected records: where the rejects file goes, writing and reading it, and the bad-row threshold.

A record that cannot be decoded is not a crash: it is set aside with its reason, one JSON line per row
(id, split, row, source, modality, reason), and the run fails with a clear message only above
data.max_bad_fraction. Rejects files are always local.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from mmfusion.errors import DataError
from mmfusion.storage import is_remote, local_path

REJECTS_NAME = "rejects.jsonl"


def is_rejects_file(name: str) -> bool:
    """A file name the readers skip: a rejects file written beside the data."""
    return name == REJECTS_NAME or name.endswith(".rejects.jsonl")


def default_rejects_path(data_path: str, rejects_path: str | None = None) -> Path:
    """Configured path, else <dataset folder>/rejects.jsonl, else <manifest>.rejects.jsonl beside the
    manifest. Rejects are always written locally: for a remote dataset the default is
    ./<name>.rejects.jsonl."""
    if rejects_path:
        if is_remote(rejects_path):
            raise DataError(f"data.rejects_path must be a local path, got {rejects_path}")
        return Path(local_path(rejects_path) or rejects_path)
    local = local_path(data_path)
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
        row = None if r.get("row") is None else int(r["row"])
        recs.append({"id": r.get("id"), "split": r.get("split"), "row": row,
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


def check_bad_fraction(num_bad: int, num_rows: int, max_bad_fraction: float, rejects_path: Path | None,
                       ) -> float:
    """The share of rejected rows; DataError (naming it, the threshold and the rejects file) above the
    threshold."""
    fraction = num_bad / num_rows if num_rows else 0.0
    if fraction > max_bad_fraction:
        raise DataError(
            f"{num_bad} of {num_rows} rows ({fraction:.1%}) could not be decoded, above "
            f"data.max_bad_fraction={max_bad_fraction:g}; the reasons are in the rejects file {rejects_path}"
        )
    return fraction


def read_rejects(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
