"""optim.encoder_lr reaches a pretrained encoder's backbone only: the projection it adds on top is new (random
init) and trains at optim.lr with the fusion and the head."""

from pathlib import Path

import torch
from tests.tiny_hf import hf_text_config, save_tiny_text_model
from torch import nn

from mmfusion.batch import InputSpec
from mmfusion.config import validate_config
from mmfusion.models.model import build_model
from mmfusion.train.loop import param_groups


def _lr_of(groups: list[dict]) -> dict[int, float]:
    return {id(p): g["lr"] for g in groups for p in g["params"]}


def _model(tmp_path: Path, freeze: bool) -> nn.Module:
    bert, tok = save_tiny_text_model(tmp_path)
    raw = hf_text_config(bert, tok)
    raw["model"]["encoders"]["text"]["freeze"] = freeze
    cfg = validate_config(raw)
    spec = InputSpec(modalities=("text",), vocab_size=64, pad_id=0, max_text_len=6)
    return build_model(cfg.model, spec, num_classes=3)


def test_hf_projection_trains_at_lr_and_its_backbone_at_encoder_lr(tmp_path: Path) -> None:
    model = _model(tmp_path, freeze=False)
    enc = model.encoders["text"]
    lrs = _lr_of(param_groups(model, lr=1e-3, weight_decay=0.01, encoder_lr={"text": 2e-4}))
    assert {lrs[id(p)] for p in enc.proj.parameters()} == {1e-3}  # new layer: the head's lr
    backbone = [p for p in enc.backbone.parameters() if p.requires_grad]
    assert backbone and {lrs[id(p)] for p in backbone} == {2e-4}  # pretrained weights: encoder_lr
    assert {lrs[id(p)] for p in model.head.parameters()} == {1e-3}
    # a single encoder_lr for every modality: the same split
    lrs = _lr_of(param_groups(model, lr=1e-3, weight_decay=0.01, encoder_lr=5e-5))
    assert {lrs[id(p)] for p in enc.proj.parameters()} == {1e-3}
    assert {lrs[id(p)] for p in backbone} == {5e-5}


def test_ddp_wrapped_model_splits_the_same_way(tmp_path: Path) -> None:
    model = _model(tmp_path, freeze=False)
    wrapper = nn.Module()
    wrapper.module = model  # what DistributedDataParallel looks like: parameters named module.*
    lrs = _lr_of(param_groups(wrapper, lr=1e-3, weight_decay=0.0, encoder_lr={"text": 2e-4}))
    enc = model.encoders["text"]
    assert {lrs[id(p)] for p in enc.proj.parameters()} == {1e-3}
    assert {lrs[id(p)] for p in enc.backbone.parameters() if p.requires_grad} == {2e-4}


def test_frozen_hf_encoder_projection_is_the_only_encoder_group_and_trains_at_lr(tmp_path: Path) -> None:
    model = _model(tmp_path, freeze=True)
    groups = param_groups(model, lr=1e-3, weight_decay=0.01, encoder_lr={"text": 2e-4})
    assert {g["lr"] for g in groups} == {1e-3}  # nothing trainable is left at encoder_lr
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in groups) == n_trainable


def test_from_scratch_encoders_still_train_wholly_at_encoder_lr() -> None:
    torch.manual_seed(0)
    cfg = validate_config({"data": {"path": "unused", "modalities": ["text"]},
                           "model": {"encoders": {"text": {"name": "lstm", "dim": 8, "hidden": 8}},
                                     "fusion": {"name": "concat", "dim": 8, "hidden": 16}}})
    spec = InputSpec(modalities=("text",), vocab_size=259, pad_id=0, max_text_len=8)
    model = build_model(cfg.model, spec, num_classes=3)
    lrs = _lr_of(param_groups(model, lr=1e-3, weight_decay=0.0, encoder_lr={"text": 2e-4}))
    assert {lrs[id(p)] for p in model.encoders["text"].parameters()} == {2e-4}  # its proj included
