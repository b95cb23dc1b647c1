"""What every built-in dataset builder shares: its output folder (atomic, cleaned after a killed build, never
a user's folder overwritten) and its sources (Debian package versions, checksums, external commands)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mmfusion
from mmfusion.errors import DataError

log = logging.getLogger(__name__)


def is_build(path: Path, name: str) -> bool:
    """True if `path` holds a finished build of dataset `name`: a data_card.json naming it."""
    try:
        card = json.loads((Path(path) / "data_card.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(card, dict) and card.get("name") == name


def check_out(out: Path, name: str, title: str) -> None:
    """`out` must be new, empty, or a previous build of the same dataset (which the new build replaces)."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not is_build(out, name):
        raise DataError(f"--out {out} is not empty and is not a previous {title} build (no data_card.json "
                        f"naming {name!r}); choose an empty or new folder")


def remove_stale_temp(out: Path) -> None:
    """Delete the temp folders of builds of `out` that were killed (their process is gone)."""
    for p in out.parent.glob(f".{out.name}.*-*"):
        m = re.fullmatch(rf"\.{re.escape(out.name)}\.(?:building|old)-(\d+)", p.name)
        if not m or not p.is_dir():
            continue
        try:
            os.kill(int(m.group(1)), 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            log.info("removing %s, left by an interrupted build", p)
            shutil.rmtree(p, ignore_errors=True)
        except PermissionError:  # someone else's live process
            pass


@contextmanager
def atomic_build(out: Path) -> Iterator[Path]:
    """Yield an empty temp folder beside `out`; on success it replaces `out` in one rename (a reader sees the
    old build or the new one, never half of one), on any failure it is deleted."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp(out)
    tmp = out.parent / f".{out.name}.building-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def run(cmd: list[str], what: str, timeout: float = 120) -> str:
    """stdout of a command the build needs; a DataError that says `what` when it is missing or fails."""
    try:
        return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=timeout).stdout
    except FileNotFoundError as e:
        raise DataError(f"{cmd[0]} not found: {what}") from e
    except subprocess.CalledProcessError as e:
        raise DataError(f"{' '.join(cmd)} failed ({what}): {e.stderr.strip()}") from e


def need_package(package: str) -> str:
    return f"the Debian package {package} is needed: `make sysdeps` or `apt-get install {package}`"


def deb_version(package: str) -> str:
    return run(["dpkg-query", "-W", "-f=${Version}", package], need_package(package)).strip()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def card_header(name: str, version: int, variant: str, seed: int, builder: str) -> dict[str, object]:
    """The first keys of every data card: which dataset, which build of it, made by which code."""
    return {"name": name, "format_version": version, "variant": variant, "seed": seed,
            "builder": f"{builder} (mmfusion {mmfusion.__version__})"}


def output_files(root: Path) -> dict[str, dict[str, object]]:
    """Every file a build wrote (but the card itself), with its checksum and size, for the data card."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != "data_card.json")
    return {p.relative_to(root).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in files}
