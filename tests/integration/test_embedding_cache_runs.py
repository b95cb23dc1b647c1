"""The embedding cache on a real local cluster: built by Ray Data once, reused by a second run, rebuilt when
the preprocessing changes or a split's build never finished; a run on cached embeddings exports the whole
model, which scores the raw val rows as the workers scored their embeddings. Both tests read one module-wide
pair of runs (cached_run)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def embed(cfg: ExperimentConfig, storage: Path, bundle: Any = None):  # noqa: ANN201
    """(bundle, cache): `bundle` is build_datasets' for cfg.data; pass one already built for the same
    cfg.data to skip that pass."""
    from mmfusion.data.pipeline import build_datasets
    from mmfusion.train.embedding_cache import embed_splits
    from mmfusion.train.trainer import data_info

    if bundle is None:
        bundle = build_datasets(cfg.data, splits=("train", "val"), seed=cfg.seed)
    cache = embed_splits(cfg, {"train": bundle.train, "val": bundle.val}, data_info(bundle), str(storage))
    return bundle, cache


@dataclass
class CachedRun:
    """A training run on a fresh cache, then a second run's embedding step (another run name: same key)."""

    models: tuple[Path, Path]
    storage: Path
    cfg: ExperimentConfig
    run: Any  # mmfusion.train.trainer.TrainRun: built the cache
    bundle: Any  # the second run's build_datasets
    again: Any  # the second run's CachedSplits: reused the cache


@pytest.fixture(scope="module")
def cached_run(ray_local, avt_tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> CachedRun:
    """Both tests read one training run that built the cache and a second run's embedding step that reused
    it (a training run costs half a minute here, most of it Ray Train start-up; each test used to pay for
    its own)."""
    from mmfusion.train.trainer import run_training

    tmp = tmp_path_factory.mktemp("embedding_cache")
    models = save_tiny_text_model(tmp / "hf")
    storage = tmp / "runs"
    cfg = hf_config(avt_tiny, storage, models)
    run = run_training(cfg)
    again = cfg.model_copy(deep=True)
    again.train.run_name = "again"  # another run (the run name is not part of the key)
    bundle, cached = embed(again, storage)
    return CachedRun(models, storage, cfg, run, bundle, cached)


def test_cache_is_built_once_reused_and_rebuilt_when_its_key_changes(cached_run: CachedRun,
                                                                     avt_tiny: Path) -> None:
    storage, cfg, models = cached_run.storage, cached_run.cfg, cached_run.models
    first = cached_run.run.metrics["embedding_cache"]  # the first run built both splits
    assert first["reused"] == {"train": False, "val": False} and set(first["build_s"]) == {"train", "val"}
    again = cached_run.again  # a second run: same key, nothing embedded
    assert again.key == first["key"] and again.reused == {"train": True, "val": True} and again.build_s == {}
    assert sorted(p.name for p in (storage / "embedding_cache").iterdir()) == [first["key"]]
    assert again.datasets["train"].count() == cached_run.bundle.train_rows
    assert again.datasets["val"].count() == cached_run.bundle.val_rows
    row = again.datasets["val"].take(1)[0]
    assert row["text_emb"].shape == (16,) and set(row) == {"text_emb", "present", "label"}
    root = storage / "embedding_cache" / first["key"]
    assert json.loads((root / "key.json").read_text())["preprocessing"]["text"]["max_length"] == 6

    _, longer = embed(hf_config(avt_tiny, storage, models, "data.text.max_length=8"), storage)
    assert longer.key != first["key"] and longer.reused == {"train": False, "val": False}

    (root / "val.json").unlink()  # as if the val build had stopped before it finished
    _, partial = embed(cfg, storage, cached_run.bundle)  # the same data config: its datasets serve again
    assert partial.key == first["key"] and partial.reused == {"train": True, "val": False}


def test_training_on_cached_embeddings_exports_the_whole_model(cached_run: CachedRun) -> None:
    from mmfusion.artifact import load_artifact

    run = cached_run.run
    cache = run.metrics["embedding_cache"]
    assert cache["reused"] == {"train": False, "val": False}
    # the workers scored val embeddings; export_run scores the raw val rows with the whole artifact model
    worker_val = run.metrics["history"][-1]["val_accuracy"]
    assert run.metrics["evaluation"]["val"]["accuracy"] == pytest.approx(worker_val, abs=1.5 / run.metrics[
        "val_rows"])
    art = load_artifact(run.artifact)
    assert any(k.startswith("encoders.text.backbone.") for k in art.model.state_dict())
    # a second run under another name reuses the cache: its embedding step (what run_training's
    # with_embedding_cache calls) embeds nothing and reads the same folder
    assert cached_run.again.reused == {"train": True, "val": True}
    assert cached_run.again.key == cache["key"]
