"""mmfusion.storage: local path or URI, staging and publishing, and the node cache of remote folders."""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs
import pytest

from mmfusion import storage


def test_uri_remote_and_local_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    assert storage.is_uri("s3://b/k") and storage.is_uri("file:///x") and not storage.is_uri("C:\\data")
    assert storage.is_remote("gs://b/k") and not storage.is_remote("file:///x")
    assert not storage.is_remote("a/b")
    assert storage.local_path("a/b") == str(tmp_path / "a" / "b")
    assert storage.local_path("file:///data/my%20set") == "/data/my set"
    assert storage.local_path("s3://b/k") is None
    assert storage.staging_dir("file:///srv/run") == Path("/srv/run")  # local: the folder itself


def test_cache_folders_are_named_and_hashed(tmp_path: Path):
    a = storage.cache_dir("artifacts", "s3://one/model", tmp_path)
    b = storage.cache_dir("artifacts", "s3://two/model", tmp_path)
    assert a.parent == b.parent == tmp_path and a.name.startswith("model-") and a != b
    assert storage.cache_dir("artifacts", "s3://one/model", tmp_path) == a  # stable
    assert storage.staging_dir("s3://one/model").parent.name == "staging"


@pytest.fixture
def bucket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """s3://... served from a local folder: storage.filesystem maps the URI into it."""
    root = tmp_path / "bucket"
    monkeypatch.setattr(storage, "filesystem",
                        lambda loc: (pafs.LocalFileSystem(), str(root / loc.split("://", 1)[1])))
    return root


def test_localize_copies_a_remote_folder_once(tmp_path: Path, bucket: Path):
    src = bucket / "b" / "model"
    src.mkdir(parents=True)
    (src / "weights").write_bytes(b"w")
    (src / "extra").write_text("x")
    cache = tmp_path / "cache"
    got = storage.localize("s3://b/model", ["weights"], ["extra", "absent"], cache_root=cache)
    assert got.parent == cache and (got / "weights").read_bytes() == b"w" and (got / "extra").is_file()
    (src / "weights").write_bytes(b"changed")
    assert (storage.localize("s3://b/model", ["weights"], cache_root=cache) / "weights").read_bytes() == b"w"
    with pytest.raises(FileNotFoundError, match="missing config"):
        storage.localize("s3://b/model", ["config"], cache_root=tmp_path / "other")


def test_localize_uses_local_folders_in_place(tmp_path: Path):
    assert storage.localize(str(tmp_path), ["anything"]) == tmp_path
    assert storage.localize(f"file://{tmp_path}", ["anything"]) == tmp_path  # file:// is not copied


def test_publish_file_and_folder(tmp_path: Path, bucket: Path):
    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "a.txt").write_text("a")
    assert storage.publish(staged, str(tmp_path / "local")) == str(staged)  # local: nothing to copy
    assert storage.publish(staged, "s3://b/run") == "s3://b/run"
    assert (bucket / "b" / "run" / "a.txt").read_text() == "a"
    storage.publish_file(staged / "a.txt", "s3://b/run/copy.txt")
    assert (bucket / "b" / "run" / "copy.txt").read_text() == "a"
