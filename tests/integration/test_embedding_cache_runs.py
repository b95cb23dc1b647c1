"""The embedding cache on a real local cluster: built by Ray Data once, reused by a second run, rebuilt when
the preprocessing changes or a split's build never finished; a run on cached embeddings exports the whole
model, which scores the raw val rows as the workers scored their embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.helpers import tiny_raw
from tests.tiny_hf import save_tiny_text_model

from mmfusion.config import ExperimentConfig, apply_overrides, validate_config

pytestmark = pytest.mark.integration


def hf_config(avt: Path, storage: Path, models: tuple[Path, Path], *overrides: str) -> ExperimentConfig:
    bert, tok = models
    raw = tiny_raw(avt, storage, "data.modalities=[text]", f"data.text.tokenizer={tok}",
                   "data.text.max_length=6", "train.epochs=1", "model.modality_dropout={}")
    raw["model"]["encoders"]["text"] = {"name": "hf", "pretrained": str(bert), "freeze": True, "dim": 8}
    return validate_config(apply_overrides(raw, list(overrides)))


def embed(cfg: ExperimentConfig, storage: Path):  # noqa: ANN201
    from mmfusion.data.pipeline import build_datasets
    from mmfusion.train.embedding_cache import embed_splits
    from mmfusion.train.trainer import data_info

    bundle = build_datasets(cfg.data, splits=("train", "val"), seed=cfg.seed)
    cache = embed_splits(cfg, {"train": bundle.train, "val": bundle.val}, data_info(bundle), str(storage))
    return bundle, cache


def test_cache_is_built_once_reused_and_rebuilt_when_its_key_changes(ray_local, avt_tiny: Path,
                                                                     tmp_path: Path) -> None:
    models = save_tiny_text_model(tmp_path / "hf")
    storage = tmp_path / "runs"
    cfg = hf_config(avt_tiny, storage, models)
    bundle, first = embed(cfg, storage)
    assert first.reused == {"train": False, "val": False} and set(first.build_s) == {"train", "val"}
    assert first.datasets["train"].count() == bundle.train_rows
    assert first.datasets["val"].count() == bundle.val_rows
    row = first.datasets["val"].take(1)[0]
    assert row["text_emb"].shape == (16,) and set(row) == {"text_emb", "present", "label"}
    root = storage / "embedding_cache" / first.key
    assert json.loads((root / "key.json").read_text())["preprocessing"]["text"]["max_length"] == 6

    _, again = embed(cfg, storage)  # a second run: same key, nothing embedded
    assert again.key == first.key and again.reused == {"train": True, "val": True} and again.build_s == {}
    assert sorted(p.name for p in (storage / "embedding_cache").iterdir()) == [first.key]

    _, longer = embed(hf_config(avt_tiny, storage, models, "data.text.max_length=8"), storage)
    assert longer.key != first.key and longer.reused == {"train": False, "val": False}

    (root / "val.json").unlink()  # as if the val build had stopped before it finished
    _, partial = embed(cfg, storage)
    assert partial.key == first.key and partial.reused == {"train": True, "val": False}


def test_training_on_cached_embeddings_exports_the_whole_model(ray_local, avt_tiny: Path,
                                                               tmp_path: Path) -> None:
    from mmfusion.artifact import load_artifact
    from mmfusion.train.trainer import run_training

    models = save_tiny_text_model(tmp_path / "hf")
    cfg = hf_config(avt_tiny, tmp_path / "runs", models)
    run = run_training(cfg)
    cache = run.metrics["embedding_cache"]
    assert cache["reused"] == {"train": False, "val": False}
    # the workers scored val embeddings; export_run scores the raw val rows with the whole artifact model
    worker_val = run.metrics["history"][-1]["val_accuracy"]
    assert run.metrics["evaluation"]["val"]["accuracy"] == pytest.approx(worker_val, abs=1.5 / run.metrics[
        "val_rows"])
    art = load_artifact(run.artifact)
    assert any(k.startswith("encoders.text.backbone.") for k in art.model.state_dict())

    again = cfg.model_copy(deep=True)
    again.train.run_name = "again"  # another run (else the same name resumes the finished one)
    rerun = run_training(again)
    assert rerun.metrics["embedding_cache"]["reused"] == {"train": True, "val": True}
    assert rerun.metrics["embedding_cache"]["key"] == cache["key"]
