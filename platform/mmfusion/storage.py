"""Local path or URI: the one place that tells them apart, opens them, stages, publishes and caches.

    plain path, file:///x      local: used in place (a file:// URI is never copied)
    s3://b/k, gs://b/k, ...    remote: read through pyarrow filesystems; written to a local staging folder
                               first and published at the end; remote folders read by several processes on a
                               node (serving replicas) are copied once into a hashed node-local cache folder

No Ray and no torch here; pyarrow is imported where it is used.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

from mmfusion.errors import DataError

if TYPE_CHECKING:
    import pyarrow.fs as pafs

log = logging.getLogger(__name__)

CACHE_ROOT = Path.home() / ".cache" / "mmfusion"


def is_uri(location: str) -> bool:
    """True for any URI (s3://, gs://, file://, ...); "C:\\data" has a one-letter scheme and is a path."""
    return len(urlparse(str(location)).scheme) > 1


def is_remote(location: str) -> bool:
    """True for URIs that are not on this machine: s3://, gs://, ... (file:// and plain paths are local)."""
    return is_uri(location) and urlparse(str(location)).scheme != "file"


def local_path(location: str) -> str | None:
    """The absolute local path of a plain path or a file:// URI; None for a remote URI."""
    if not is_uri(location):
        return os.path.abspath(os.path.expanduser(location))
    u = urlparse(location)
    return unquote(u.path) if u.scheme == "file" else None


_FS_CACHE: dict[str, pafs.FileSystem] = {}


def filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a local path or a URI. DataError if it cannot be opened."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    local = local_path(location)
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


def read_bytes(location: str) -> bytes:
    """The bytes of a local file or URI. FileNotFoundError / OSError propagate."""
    local = local_path(location)
    if local is not None:
        with open(local, "rb") as f:
            return f.read()
    fs, inner = filesystem(location)
    with fs.open_input_stream(inner) as f:
        return f.read()


def cache_dir(kind: str, location: str, root: str | Path | None = None) -> Path:
    """The node-local folder for a remote `location`: <root or ~/.cache/mmfusion/KIND>/<name>-<hash>.
    The hash of the whole URI keeps two folders with the same name apart."""
    key = hashlib.sha256(location.encode()).hexdigest()[:16]
    base = Path(root) if root else CACHE_ROOT / kind
    return base / f"{Path(location.rstrip('/')).name}-{key}"


def staging_dir(location: str) -> Path:
    """Where to write files bound for `location`: the folder itself when local, else a local staging folder
    (published with `publish`). Multi-node runs keep their storage on s3:// or gs://."""
    local = local_path(location)
    return Path(local) if local is not None else cache_dir("staging", location)


def publish(local: Path, location: str) -> str:
    """Copy a staged folder to a remote `location` (pyarrow filesystems); a no-op for local locations."""
    if not is_remote(location):
        return str(local)
    import pyarrow.fs as pafs

    fs, inner = filesystem(location)
    fs.create_dir(inner, recursive=True)
    pafs.copy_files(str(local), inner, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    log.info("published %s to %s", local, location)
    return location


def publish_file(local: Path, location: str) -> None:
    """Write one local file to `location` (a path or URI), replacing it."""
    fs, inner = filesystem(location)
    with fs.open_output_stream(inner) as f:
        f.write(local.read_bytes())


def localize(location: str, required: Sequence[str], optional: Sequence[str] = (), kind: str = "remote",
             cache_root: str | Path | None = None) -> Path:
    """A local folder holding `location`'s files: a local path or file:// URI as it is (not copied), a remote
    folder's `required` and `optional` files copied once into `cache_dir(kind, location, cache_root)`.

    The copy lands in a temp folder renamed into place, so concurrent processes on one node never see half a
    copy. FileNotFoundError names a missing required file; other OSErrors propagate.
    """
    local = local_path(location)
    if local is not None:
        return Path(local)
    dest = cache_dir(kind, location, cache_root)
    if all((dest / f).is_file() for f in required):
        return dest
    fs, inner = filesystem(location)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=dest.parent))
    try:
        for name in (*required, *optional):
            try:
                with fs.open_input_stream(f"{inner.rstrip('/')}/{name}") as src:
                    (tmp / name).write_bytes(src.read())
            except FileNotFoundError:
                if name in required:
                    raise FileNotFoundError(f"missing {name}") from None
        try:
            os.replace(tmp, dest)
        except OSError:  # another process won the race
            pass
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("%s copied to %s", location, dest)
    return dest
