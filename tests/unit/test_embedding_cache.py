"""The embedding cache without Ray: when it is on, what its key covers (invalidation), and that training on
cached embeddings is the whole model's computation (same logits, same state dict, gradients only after the
frozen backbones)."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tests.tiny_hf import LABELS, WORDS, hf_text_config, save_tiny_text_model

from mmfusion.config import ExperimentConfig, validate_config
from mmfusion.data.preprocessor import input_spec
from mmfusion.data.text import load_tokenizer, text_batch
from mmfusion.errors import ConfigError
from mmfusion.train.embedding_cache import (
    CachedFusionModel,
    EmbedBatch,
    backbone_hashes,
    build_frozen_model,
    cache_key,
    cached_model,
    data_fingerprints,
    emb_key,
    enabled,
    key_parts,
    media_fingerprint,
    prune,
    weights_hash,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(bert, tokenizer, data folder with a train Parquet)."""
    root = tmp_path_factory.mktemp("cache")
    bert, tok = save_tiny_text_model(root)
    (root / "data").mkdir()
    pq.write_table(pa.table({"text": WORDS, "label": LABELS}), root / "data" / "train.parquet")
    return bert, tok, root / "data"


def config(bert: Path, tok: Path, data: Path, *overrides: tuple[str, object]) -> ExperimentConfig:
    raw = hf_text_config(bert, tok)
    raw["data"]["path"] = str(data)
    for dotted, value in overrides:
        node = raw
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return validate_config(raw)


def key_of(cfg: ExperimentConfig) -> str:
    model = build_frozen_model(cfg, input_spec(cfg.data), len(LABELS))
    media = media_fingerprint(cfg.data.path, list(cfg.data.modalities), cfg.data.label_column)
    return cache_key(key_parts(cfg, LABELS, backbone_hashes(model), data_fingerprints(cfg.data.path), media))


def test_enabled_only_when_every_encoder_is_frozen(tiny: tuple[Path, Path, Path]) -> None:
    bert, tok, data = tiny
    assert enabled(config(bert, tok, data))
    assert not enabled(config(bert, tok, data, ("train.embedding_cache", "off")))
    assert not enabled(config(bert, tok, data, ("train.embedding_cache", False)))  # YAML reads `off` as false
    assert not enabled(config(bert, tok, data, ("model.encoders.text.freeze", False)))
    both = config(bert, tok, data, ("data.modalities", ["image", "text"]))  # the image encoder is a CNN
    assert not enabled(both)
    frozen_resnet = config(bert, tok, data, ("data.modalities", ["image", "text"]),
                           ("model.encoders.image", {"name": "resnet", "freeze": True}))
    assert enabled(frozen_resnet)


def test_key_is_stable_and_changes_with_each_part(tiny: tuple[Path, Path, Path], tmp_path: Path) -> None:
    bert, tok, data = tiny
    base = key_of(config(bert, tok, data))
    assert key_of(config(bert, tok, data)) == base  # a second run finds the same folder
    # the trainable head is not part of the key: its size, the fusion and the optimizer may change freely
    assert key_of(config(bert, tok, data, ("model.encoders.text.dim", 4), ("optim.lr", 0.1))) == base
    assert key_of(config(bert, tok, data, ("data.text.max_length", 5))) != base  # preprocessing
    assert key_of(config(bert, tok, data, ("data.val_fraction", 0.2))) != base  # which rows are val
    assert key_of(config(bert, tok, data, ("seed", 1))) != base

    other = tmp_path / "data"  # the same rows in another file, then the file rewritten
    other.mkdir()
    (other / "train.parquet").write_bytes((data / "train.parquet").read_bytes())
    moved = key_of(config(bert, tok, other))
    assert moved != base
    st = os.stat(other / "train.parquet")
    os.utime(other / "train.parquet", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert key_of(config(bert, tok, other)) != moved  # data files' fingerprints

    from transformers import BertModel

    retrained = BertModel.from_pretrained(bert)
    with torch.no_grad():
        retrained.embeddings.word_embeddings.weight[5] += 1.0
    retrained.save_pretrained(tmp_path / "bert2")
    assert key_of(config(tmp_path / "bert2", tok, data)) != base  # encoder weights


def touch(path: Path, seconds: int) -> None:
    """Move a file's modification time `seconds` into the future (or the past)."""
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 10**9))


def test_media_files_named_by_the_records_are_part_of_the_key(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    for name in ("a.png", "b.png"):
        (tmp_path / "img" / name).write_bytes(b"not decoded here")
    manifest = tmp_path / "jsonl"
    manifest.mkdir()
    (manifest / "train.jsonl").write_text('{"image": "../img/a.png", "text": "x", "label": "0"}\n'
                                          f'{{"image": "{tmp_path}/img/b.png", "label": "1"}}\n')
    table = tmp_path / "parquet"  # the same paths in a Parquet string column
    table.mkdir()
    pq.write_table(pa.table({"image": ["../img/a.png", str(tmp_path / "img/b.png")], "label": [0, 1]}),
                   table / "train.parquet")
    for data in (manifest, table):
        base = media_fingerprint(str(data), ["image", "text"])
        assert base["files"] == 2 and media_fingerprint(str(data), ["image", "text"]) == base
        assert media_fingerprint(str(data), ["text"])["files"] == 0  # no media modality configured
        touch(tmp_path / "img" / "a.png", 5)  # the manifest is untouched: only the media file changed
        assert media_fingerprint(str(data), ["image"]) != base
        (tmp_path / "img" / "b.png").unlink()  # a missing file counts too
        gone = media_fingerprint(str(data), ["image"])
        assert gone["files"] == 2 and gone != base
        (tmp_path / "img" / "b.png").write_bytes(b"not decoded here")
    # inline bytes: only the data file's own fingerprint matters, no media file is read
    inline = tmp_path / "inline"
    inline.mkdir()
    pq.write_table(pa.table({"image": pa.array([b"png"]), "label": [0]}), inline / "train.parquet")
    assert media_fingerprint(str(inline), ["image"])["files"] == 0


def fake_cache(root: Path, key: str, weights: str, age_s: int) -> Path:
    folder = root / key
    (folder / "train-0").mkdir(parents=True)
    (folder / "key.json").write_text(f'{{"weights": {{"text": "{weights}"}}}}')
    touch(folder / "key.json", -age_s)
    return folder


def test_prune_keeps_the_most_recently_used_per_encoder(tmp_path: Path) -> None:
    root = tmp_path / "embedding_cache"
    for i in range(5):  # encoder A: a1 used 1 hour ago ... a5 used 5 hours ago
        fake_cache(root, f"a{i + 1}", "A", 3600 * (i + 1))
    fake_cache(root, "b1", "B", 7200)  # another encoder: its own quota
    fake_cache(root, "recent", "A", 60)  # in use right now (a concurrent run): never pruned
    (root / "stray").mkdir()  # no key.json: not ours, left alone
    deleted = prune(str(root), keep=2, keep_key="a5")
    assert sorted(deleted) == ["a2", "a3", "a4"]  # kept: recent, a1 (the newest 2), a5 (this run's)
    assert sorted(p.name for p in root.iterdir()) == ["a1", "a5", "b1", "recent", "stray"]
    assert prune(str(root), keep=2, keep_key="a5") == []
    assert prune(str(tmp_path / "nothing"), keep=1) == []


def test_weights_hash_sees_every_byte() -> None:
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    h = weights_hash(a)
    assert weights_hash(a) == h and len(h) == 16
    with torch.no_grad():
        a[0].weight[1, 2] += 1e-6
    assert weights_hash(a) != h
    h = weights_hash(a)
    a[1].num_batches_tracked += 1  # buffers count too
    assert weights_hash(a) != h


def embed_numpy(cfg: ExperimentConfig, texts: list[str | None]) -> tuple[dict, dict]:
    """A preprocessed numpy batch (as Ray Data holds it) and EmbedBatch's output for it."""
    ids, mask, _, _ = text_batch(texts, cfg.data.text, load_tokenizer(cfg.data.text))
    present = np.array([[t is not None] for t in texts])
    batch = {"text": ids, "text_mask": mask, "present": present, "label": np.arange(len(texts)) % 10}
    spec = input_spec(cfg.data)
    info = {"labels": LABELS, "spec": asdict(spec)}
    model = build_frozen_model(cfg, spec, len(LABELS))
    actor = EmbedBatch(cfg.model_dump(mode="json"), info, backbone_hashes(model), "cpu")
    return batch, actor(batch)


def test_cached_model_gives_the_whole_models_logits_and_trains_only_after_the_backbone(
        tiny: tuple[Path, Path, Path]) -> None:
    bert, tok, data = tiny
    cfg = config(bert, tok, data)
    texts = [*WORDS[:5], None, *WORDS[5:]]  # one row without text
    batch, emb = embed_numpy(cfg, texts)
    assert emb[emb_key("text")].shape == (11, 16) and emb[emb_key("text")].dtype == np.float32
    assert not emb[emb_key("text")][5].any()  # the row without text: zeros

    model = build_frozen_model(cfg, input_spec(cfg.data), len(LABELS)).eval()
    cached = cached_model(model, {"key": "k", "weights": backbone_hashes(model)}).eval()
    assert cached.state_dict().keys() == model.state_dict().keys()  # checkpoints hold the whole model
    full = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items() if k != "label"}
    fed = {k: torch.from_numpy(np.asarray(v)) for k, v in emb.items() if k != "label"}
    with torch.no_grad():
        torch.testing.assert_close(cached(fed), model(full), atol=1e-5, rtol=1e-4)

    cached.train()
    cached(fed).sum().backward()
    with_grad = {n for n, p in cached.named_parameters() if p.grad is not None}
    assert with_grad and all(not n.startswith("encoders.text.backbone.") for n in with_grad)
    assert "encoders.text.proj.weight" in with_grad


def test_embed_batch_and_workers_refuse_other_weights(tiny: tuple[Path, Path, Path]) -> None:
    bert, tok, data = tiny
    cfg = config(bert, tok, data)
    spec = input_spec(cfg.data)
    info = {"labels": LABELS, "spec": asdict(spec)}
    with pytest.raises(ConfigError, match="differ from the driver's"):
        EmbedBatch(cfg.model_dump(mode="json"), info, {"text": "0" * 16}, "cpu")
    model = build_frozen_model(cfg, spec, len(LABELS))
    with pytest.raises(ConfigError, match="embedding_cache=off"):
        cached_model(model, {"key": "k", "weights": {"text": "0" * 16}})
    assert isinstance(cached_model(model, {"key": "k", "weights": backbone_hashes(model)}), CachedFusionModel)
