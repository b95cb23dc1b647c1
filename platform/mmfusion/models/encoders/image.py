"""Image encoders: `(B, C, H, W)` float32 normalized pixels -> `(B, D)`.

    CnnImageEncoder     Conv(32)-Conv(64)-Flatten with BatchNorm; small images (average-pooled to 7x7)
    ResnetImageEncoder  torchvision ResNet-18/34/50; weights from a local file or torchvision's named weights
    HfImageEncoder      a Hugging Face vision encoder (ViT, DINOv2, CLIP's or SigLIP's vision tower, ...)

Pretrained backbones expect 3-channel input: a grayscale image is repeated over the channels inside the
encoder (so pretrained first-layer filters still apply), and HF encoders resize to the model's image size.
Pixels arrive normalized with the data config's mean/std (mmfusion.data.image), not the backbone's own
statistics; fine-tuning (or the trainable projection of a frozen backbone) absorbs the difference.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmfusion.errors import ConfigError
from mmfusion.models.encoders import (
    ConvStack,
    FrozenBackboneMixin,
    hf_pooled,
    hf_tower,
    load_hf_model,
)

log = logging.getLogger(__name__)

RESNET_ARCHS = ("resnet18", "resnet34", "resnet50")
WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


class CnnImageEncoder(nn.Module):
    """Conv stack over small images: `(B, C, H, W) -> (B, dim)`; see `ConvStack` for the layer layout."""

    def __init__(self, in_shape: tuple[int, int, int], channels: list[int], dim: int = 128,
                 dropout: float = 0.1) -> None:
        super().__init__()
        c, h, w = in_shape
        self.net = ConvStack(c, (h, w), channels, dim, dropout)
        self.out_dim = dim

    def forward(self, image: Tensor) -> Tensor:  # (B, C, H, W) -> (B, dim)
        return self.net(image)


class ResnetImageEncoder(FrozenBackboneMixin):
    """torchvision ResNet without its classifier: `(B, C, H, W) -> (B, 512 | 2048)`, or `(B, dim)` projected.

    Args:
        arch: resnet18 | resnet34 | resnet50.
        in_channels: 1 (grayscale, repeated to RGB) or 3.
        weights: None (random init); a local state-dict file (.pt/.pth/.bin/.safetensors, torchvision's
            layout, the `fc.*` keys are ignored); or a torchvision weights name ("IMAGENET1K_V1", "DEFAULT",
            "ResNet18_Weights.IMAGENET1K_V1"), downloaded by torchvision to its cache when online.
        freeze: keep the backbone fixed (no gradients, eval-mode BatchNorm).
        dim: add a trainable Linear to this size; None keeps the backbone's width.
        load_weights: False skips `weights` (an artifact's state dict replaces them anyway).
    """

    def __init__(self, arch: str = "resnet18", in_channels: int = 3, weights: str | None = None,
                 freeze: bool = False, dim: int | None = None, load_weights: bool = True) -> None:
        super().__init__()
        import torchvision

        if arch not in RESNET_ARCHS:
            raise ConfigError(f"unknown resnet arch {arch!r}; known: {', '.join(RESNET_ARCHS)}")
        if in_channels not in (1, 3):
            raise ConfigError(f"resnet image encoder takes 1 or 3 channels, got {in_channels}")
        tv_weights = None
        if weights is not None and load_weights and not _is_weight_file(weights):
            tv_weights = _torchvision_weights(arch, weights)
        try:
            net = torchvision.models.get_model(arch, weights=tv_weights)
        except (OSError, RuntimeError) as e:  # download failed (offline) or a corrupt cached file
            raise ConfigError(f"cannot load torchvision weights {weights!r} for {arch}: {e} "
                              "(offline: pass a local weights file instead)") from None
        width = net.fc.in_features
        net.fc = nn.Identity()
        if weights is not None and load_weights and _is_weight_file(weights):
            _load_state_file(net, weights)
        self.backbone = net
        self.in_channels = in_channels
        self.proj: nn.Module = nn.Linear(width, dim) if dim else nn.Identity()
        self.out_dim = dim or width
        if freeze:
            self.freeze_backbone()

    def _backbone(self, image: Tensor) -> Tensor:  # (B, C, H, W) -> (B, width)
        if image.shape[1] == 1:
            image = image.expand(-1, 3, -1, -1)  # grayscale -> RGB, so pretrained conv1 filters apply
        return self.backbone(image)


class HfImageEncoder(FrozenBackboneMixin):
    """A Hugging Face vision encoder by hub name or local folder: `(B, C, H, W) -> (B, hidden | dim)`.

    Works with single-tower vision models (ViTModel, Dinov2Model, CLIPVisionModel, ...) and takes the vision
    tower of dual models (CLIPModel, SiglipModel). Inputs are adapted to the model: a gray channel is
    repeated to the model's `num_channels` and images are bilinearly resized to its `image_size`.
    The embedding is the model's pooled output (CLS-based for ViT/DINOv2/CLIP), else the token mean.
    """

    def __init__(self, name_or_path: str, in_shape: tuple[int, int, int], freeze: bool = True,
                 dim: int | None = None, load_weights: bool = True) -> None:
        super().__init__()
        self.backbone = hf_tower(load_hf_model(name_or_path, pretrained=load_weights), "vision")
        cfg = self.backbone.config
        self.num_channels = int(getattr(cfg, "num_channels", 3))
        size = getattr(cfg, "image_size", None)
        if size is None:
            raise ConfigError(f"Hugging Face model {name_or_path!r} is not a vision encoder (no image_size)")
        self.image_size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
        c = in_shape[0]
        if c != self.num_channels and c != 1:
            raise ConfigError(f"image has {c} channels but {name_or_path!r} takes {self.num_channels} "
                              "(set data.image.channels to 1 or to the model's channel count)")
        self.setup_head(name_or_path, dim, freeze, lambda: self._backbone(torch.zeros(2, *in_shape)))

    def _backbone(self, image: Tensor) -> Tensor:  # (B, C, H, W) -> (B, hidden)
        if image.shape[1] != self.num_channels:
            image = image.expand(-1, self.num_channels, -1, -1)
        if tuple(image.shape[-2:]) != self.image_size:
            image = F.interpolate(image, size=self.image_size, mode="bilinear", align_corners=False)
        return hf_pooled(self.backbone(pixel_values=image))



# ------------------------------------------------------------------------------------------ weights


def _is_weight_file(weights: str) -> bool:
    return weights.endswith(WEIGHT_FILE_SUFFIXES) or "/" in weights or Path(weights).exists()


def _torchvision_weights(arch: str, name: str):  # -> torchvision.models.WeightsEnum
    import torchvision

    enum = torchvision.models.get_model_weights(arch)
    short = name.split(".", 1)[1] if name.startswith(enum.__name__ + ".") else name
    if short == "DEFAULT":
        return enum.DEFAULT
    if short not in enum.__members__:
        known = ", ".join(["DEFAULT", *enum.__members__])
        raise ConfigError(f"unknown torchvision weights {name!r} for {arch}; known: {known} "
                          "(or give a local .pt/.safetensors file)")
    return enum[short]


def _load_state_file(net: nn.Module, path: str) -> None:
    """Load a ResNet state dict (torchvision layout) from a local file into `net` (whose fc is removed)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"resnet weights file not found: {path}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(p))
    else:
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # not a tensor-only pickle, or not a torch file at all
            raise ConfigError(f"cannot read resnet weights {path}: {e}") from None
    for key in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ConfigError(f"resnet weights {path} hold a {type(state).__name__}, not a state dict")
    clean = {}
    for k, v in state.items():
        for prefix in ("module.", "backbone."):  # DDP-wrapped or saved from this encoder
            k = k.removeprefix(prefix)
        if not k.startswith("fc."):
            clean[k] = v
    try:
        missing, unexpected = net.load_state_dict(clean, strict=False)
    except RuntimeError as e:  # same keys, other shapes (e.g. resnet50 weights for a resnet18)
        raise ConfigError(f"resnet weights {path} do not fit {type(net).__name__}: {str(e)[:300]}") from None
    if missing or unexpected:
        raise ConfigError(f"resnet weights {path} do not match {type(net).__name__}: "
                          f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                          f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    log.info("loaded resnet weights from %s", path)
