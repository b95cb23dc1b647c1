"""FusionModel (encoders -> fusion -> head), the name registries, and `build_model(cfg, spec, num_classes)`.

    logits = model({"image": (B,C,H,W), "text": (B,L), "text_mask": (B,L), "audio": (B,1,F,T),
                    "present": (B,M) bool})                                           # (B, num_classes)

The batch follows the contract in mmfusion.batch. Only `build_model` sees configs: the registries map a
config's `name` to a small builder that turns the typed sub-config into the module's flat arguments.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from mmfusion.batch import INPUT_KEYS, InputSpec
from mmfusion.config import FusionConfig, ModelConfig
from mmfusion.errors import ConfigError
from mmfusion.models.encoders.audio import CnnAudioEncoder, HfAudioEncoder
from mmfusion.models.encoders.image import CnnImageEncoder, HfImageEncoder, ResnetImageEncoder
from mmfusion.models.encoders.text import HfTextEncoder, RnnTextEncoder, TransformerTextEncoder
from mmfusion.models.fusion import (
    AttentionFusion,
    ConcatFusion,
    Fusion,
    GatedFusion,
    LateFusion,
    LowRankFusion,
    MlpHead,
    TensorFusion,
)

log = logging.getLogger(__name__)


class FusionModel(nn.Module):
    """Per-modality encoders, a fusion operator and a classifier head.

    Args:
        encoders: modality -> encoder (each exposes `out_dim`); their order is the presence-mask column order.
        fusion: a `Fusion` over the same modalities in the same order.
        head: `(B, fusion.out_dim) -> (B, num_classes)`; `nn.Identity()` when the fusion emits logits.
        modality_dropout: modality -> train-time probability of hiding it from a row.
    """

    def __init__(self, encoders: dict[str, nn.Module], fusion: Fusion, head: nn.Module,
                 modality_dropout: dict[str, float] | None = None) -> None:
        super().__init__()
        self.modalities: tuple[str, ...] = tuple(encoders)
        if fusion.modalities != self.modalities:
            raise ValueError(f"fusion modalities {fusion.modalities} differ from the encoders' "
                             f"{self.modalities}")
        unknown = set(self.modalities) - set(INPUT_KEYS)
        if unknown:
            raise ValueError(f"unknown modalities {sorted(unknown)}; known: {', '.join(INPUT_KEYS)}")
        self.encoders = nn.ModuleDict(encoders)
        self.fusion = fusion
        self.head = head
        drop = {m: float(p) for m, p in (modality_dropout or {}).items() if m in self.modalities}
        bad = {m: p for m, p in drop.items() if not 0.0 <= p < 1.0}
        if bad:
            raise ValueError(f"modality dropout must be in [0, 1), got {bad}")
        # (M,) per-column probabilities; a buffer so it follows .to(device), not saved in the state dict
        self.register_buffer("drop_p", torch.tensor([drop.get(m, 0.0) for m in self.modalities]),
                             persistent=False)

    # ------------------------------------------------------------------------------------------ parts

    def encode(self, modality: str, batch: dict[str, Tensor]) -> Tensor:
        """`(B, D)` embedding of one modality from its batch tensors (all rows are encoded)."""
        if modality not in self.encoders:
            raise ValueError(f"this model has no {modality!r} encoder; it has {', '.join(self.modalities)}")
        enc = self.encoders[modality]
        if modality == "text":
            return enc(batch["text"], batch.get("text_mask"))  # (B, L), (B, L) -> (B, D)
        return enc(batch[modality])  # image (B, C, H, W) / audio (B, 1, F, T) -> (B, D)

    def fuse(self, feats: dict[str, Tensor], present: Tensor) -> Tensor:
        """`(B, num_classes)` logits from per-modality embeddings and the `(B, M)` presence mask.

        A modality may be left out of `feats` only if no row has it (its mask column is all False).
        """
        present = present.bool()
        ref = next((feats[m] for m in self.modalities if m in feats), None)
        if ref is None:
            raise ValueError(f"fuse() got no embeddings; expected some of {', '.join(self.modalities)}")
        full = {}
        for i, m in enumerate(self.modalities):
            if m in feats:
                full[m] = feats[m]
            elif bool(present[:, i].any()):
                raise ValueError(f"fuse(): {m!r} is marked present in some rows but has no embedding")
            else:
                full[m] = ref.new_zeros(ref.shape[0], self.fusion.in_dims[m])
        return self.head(self.fusion(full, present))

    # ---------------------------------------------------------------------------------------- forward

    def forward(self, batch: dict[str, Tensor]) -> Tensor:  # -> (B, num_classes)
        present = self.presence(batch)  # (B, M) bool
        if self.training and bool((self.drop_p > 0).any()):
            present = self.drop_modalities(present)
        feats = {m: self._encode_rows(m, batch, present[:, i]) for i, m in enumerate(self.modalities)}
        return self.fuse(feats, present)

    def presence(self, batch: dict[str, Tensor]) -> Tensor:
        """The batch's `(B, M)` presence mask; without "present", a modality is present iff its tensor is."""
        given = [m for m in self.modalities if INPUT_KEYS[m][0] in batch]
        if not given:
            raise ValueError(f"the batch has none of this model's inputs ({', '.join(self.modalities)}); "
                             f"keys: {sorted(batch)}")
        ref = batch[INPUT_KEYS[given[0]][0]]
        if "present" in batch:
            present = batch["present"].bool()
            if present.shape != (ref.shape[0], len(self.modalities)):
                raise ValueError(f"batch['present'] has shape {tuple(present.shape)}, expected "
                                 f"({ref.shape[0]}, {len(self.modalities)}) with columns {self.modalities}")
            return present
        cols = [torch.full((ref.shape[0],), m in given, dtype=torch.bool, device=ref.device)
                for m in self.modalities]
        return torch.stack(cols, dim=1)

    def drop_modalities(self, present: Tensor) -> Tensor:
        """Train-time modality dropout: clear each bit with its modality's probability, but never a row's last
        present modality (such rows keep their original mask). Returns a new mask; the input is untouched."""
        drop = torch.rand(present.shape, device=present.device) < self.drop_p  # (B, M)
        dropped = present & ~drop
        keep_all = ~dropped.any(dim=1, keepdim=True)  # rows that would lose everything
        return torch.where(keep_all, present, dropped)

    def _encode_rows(self, modality: str, batch: dict[str, Tensor], rows: Tensor) -> Tensor:
        """Encode only the rows that have the modality; the others get zeros (the fusion ignores them).

        Absent rows never reach the encoder, so they cannot move BatchNorm statistics or cost compute. In
        training, a modality present in fewer than two rows is encoded for the whole batch (the fusion still
        ignores the absent rows): with none, so that its parameters stay in the autograd graph, which DDP
        requires; with one, because BatchNorm cannot compute statistics from a single sample.
        """
        keys = [k for k in INPUT_KEYS[modality] if k in batch]
        n, b = int(rows.sum()), rows.shape[0]
        if INPUT_KEYS[modality][0] not in batch:  # allowed at inference when no row has the modality
            if n or self.training:
                raise ValueError(f"the batch has no {modality!r} tensor but " + (
                    "some rows are marked present" if n else "training needs it (zeros with present=False)"))
            return torch.zeros(b, self.fusion.in_dims[modality], device=rows.device)
        if n == b or (n < 2 and self.training):  # (one row: BatchNorm cannot train on a single sample)
            return self.encode(modality, batch)
        if n == 0:
            return torch.zeros(b, self.fusion.in_dims[modality], device=rows.device)
        idx = rows.nonzero().squeeze(1)  # (n,)
        out = self.encode(modality, {k: batch[k].index_select(0, idx) for k in keys})  # (n, D)
        return out.new_zeros(b, out.shape[1]).index_copy(0, idx, out)


# --------------------------------------------------------------------------------------- registries

EncoderBuilder = Callable[[Any, InputSpec, bool], nn.Module]  # (sub-config, spec, load_weights) -> encoder
FusionBuilder = Callable[[FusionConfig, dict[str, int], int], Fusion]  # (cfg, in_dims, num_classes) -> fusion


def _image_cnn(cfg: Any, spec: InputSpec, load_weights: bool) -> nn.Module:
    return CnnImageEncoder(spec.image_shape, cfg.channels, cfg.dim, cfg.dropout)


def _image_resnet(cfg: Any, spec: InputSpec, load_weights: bool) -> nn.Module:
    return ResnetImageEncoder(cfg.arch, spec.image_shape[0], cfg.weights, cfg.freeze, cfg.dim, load_weights)


def _image_hf(cfg: Any, spec: InputSpec, load_weights: bool) -> nn.Module:
    return HfImageEncoder(cfg.pretrained, spec.image_shape, cfg.freeze, cfg.dim, load_weights)


def _text_rnn(cfg: Any, spec: InputSpec, load_weights: bool) -> nn.Module:
    return RnnTextEncoder(spec.vocab_size, spec.pad_id, cfg.cell, cfg.embed_dim, cfg.hidden, cfg.layers,
                          cfg.bidirectional, cfg.dim, cfg.dropout)


def _text_transformer(cfg: Any, spec: InputSpec, load_weights: bool) -> nn.Module:
    return TransformerTextEncoder(spec.vocab_size, spec.pad_id, spec.max_text_len, cfg.dim, cfg.layers,
                                  cfg.heads, cfg.ffn_mult, cfg.dropout)


def _text_hf(cfg: Any, spec: InputSpec, load_weights: bool) -> nn.Module:
    return HfTextEncoder(cfg.pretrained, spec.vocab_size, spec.pad_id, spec.max_text_len, cfg.freeze, cfg.dim,
                         load_weights)


def _audio_cnn(cfg: Any, spec: InputSpec, load_weights: bool) -> nn.Module:
    return CnnAudioEncoder(spec.audio_shape, cfg.channels, cfg.dim, cfg.dropout)


def _audio_hf(cfg: Any, spec: InputSpec, load_weights: bool) -> nn.Module:
    return HfAudioEncoder(cfg.pretrained, spec.audio_shape, cfg.freeze, cfg.dim, load_weights)


ENCODERS: dict[str, dict[str, EncoderBuilder]] = {
    "image": {"cnn": _image_cnn, "resnet": _image_resnet, "hf": _image_hf},
    "text": {"lstm": _text_rnn, "transformer": _text_transformer, "hf": _text_hf},
    "audio": {"cnn": _audio_cnn, "hf": _audio_hf},
}

FUSIONS: dict[str, FusionBuilder] = {
    "concat": lambda c, dims, k: ConcatFusion(dims, c.dim, c.dropout),
    "attention": lambda c, dims, k: AttentionFusion(dims, c.dim, c.heads, dropout=c.dropout),
    "gated": lambda c, dims, k: GatedFusion(dims, c.dim, c.dropout),
    "tensor": lambda c, dims, k: TensorFusion(dims, c.dim, c.tensor_dim, c.dropout),
    "low_rank": lambda c, dims, k: LowRankFusion(dims, c.dim, c.rank, c.dropout),
    "late": lambda c, dims, k: LateFusion(dims, k, c.hidden, c.dropout),
}


def build_model(cfg: ModelConfig, spec: InputSpec, num_classes: int,
                load_weights: bool = True) -> FusionModel:
    """Build encoders for `spec.modalities` (in that order), the configured fusion and the head.

    Args:
        cfg: the experiment's model section.
        spec: input shapes and vocabulary (mmfusion.data.preprocessor.input_spec(cfg.data)).
        num_classes: number of labels.
        load_weights: False builds pretrained encoders with random weights and downloads nothing (use it when
            an artifact's state dict is loaded right after).
    Raises:
        ConfigError: an unknown encoder or fusion name (the message lists the known ones), or sizes that
            do not fit together.
    """
    if num_classes < 2:
        raise ConfigError(f"a classifier needs at least 2 classes, the data has {num_classes}")
    encoders: dict[str, nn.Module] = {}
    for m in spec.modalities:
        if m not in ENCODERS:
            raise ConfigError(f"unknown modality {m!r}; known: {', '.join(ENCODERS)}")
        sub = getattr(cfg.encoders, m)
        builder = ENCODERS[m].get(sub.name)
        if builder is None:
            raise ConfigError(f"unknown {m} encoder {sub.name!r} (model.encoders.{m}.name); "
                              f"known: {', '.join(ENCODERS[m])}")
        encoders[m] = builder(sub, spec, load_weights)
    fusion_builder = FUSIONS.get(cfg.fusion.name)
    if fusion_builder is None:
        raise ConfigError(f"unknown fusion {cfg.fusion.name!r} (model.fusion.name); "
                          f"known: {', '.join(FUSIONS)}")
    fusion = fusion_builder(cfg.fusion, {m: int(e.out_dim) for m, e in encoders.items()}, num_classes)
    head: nn.Module = (nn.Identity() if fusion.emits_logits
                       else MlpHead(fusion.out_dim, cfg.fusion.hidden, num_classes, cfg.fusion.dropout))
    drop = {m: p for m, p in cfg.modality_dropout.items() if m in spec.modalities}
    model = FusionModel(encoders, fusion, head, drop)
    log.debug("built %s with %d parameters", cfg.fusion.name, sum(p.numel() for p in model.parameters()))
    return model
