"""Image preprocessing: encoded bytes -> normalized float pixels, in two steps that training and serving
share. torchvision is imported when first used.

    image bytes -> PIL decode (pixel budget checked first) -> alpha composited onto data.image.background
                -> torchvision v2 resize -> uint8 (C, H, W)           image_pixels: Ray Data's Preprocessor
                -> scale + normalize -> float32 (C, H, W)             normalize_images: the collate step
                                                                      (training) or image_batch (serving)
Images stay uint8 in the object store (4x smaller than float32) and are normalized in the worker.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from mmfusion.config import ImagePreprocessConfig
from mmfusion.errors import ConfigError, DecodeError

# The decode budget (docs/security.md), checked from the header before any pixel is decoded: only these
# Pillow formats are opened (no ICO, TIFF, EPS/Ghostscript, ...), at most 4096 x 4096 pixels, and only the
# first frame of an animated GIF/WebP/APNG is decoded.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
MAX_IMAGE_PIXELS = 4096 * 4096
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")  # PIL modes with an alpha channel


def norm_stats(cfg: ImagePreprocessConfig) -> tuple[list[float], list[float]]:
    c = cfg.channels

    def expand(name: str, v: list[float]) -> list[float]:
        if len(v) == 1:
            return v * c
        if len(v) != c:
            raise ConfigError(f"data.image.{name} has {len(v)} values but data.image.channels is {c} "
                              f"(give 1 or {c})")
        return list(v)

    mean, std = expand("mean", cfg.mean), expand("std", cfg.std)
    if any(s <= 0 for s in std):
        raise ConfigError(f"data.image.std must be positive, got {cfg.std}")
    return mean, std


def background_rgb(cfg: ImagePreprocessConfig) -> tuple[int, int, int]:
    """data.image.background as an RGB colour (one value is a gray)."""
    bg = list(cfg.background)
    if len(bg) not in (1, 3):
        raise ConfigError(f"data.image.background has {len(bg)} values; give 1 (gray) or 3 (R, G, B)")
    r, g, b = bg * 3 if len(bg) == 1 else bg
    return r, g, b


def _flatten_alpha(im: Any, background: tuple[int, int, int]) -> Any:
    """An image with transparency (an alpha channel, or a palette/tRNS transparent colour) composited onto
    `background`, so that transparent pixels show the background, not whatever colour they store. -> RGB"""
    from PIL import Image

    if im.mode not in ALPHA_MODES and "transparency" not in im.info:
        return im
    rgba = im.convert("RGBA")
    base = Image.new("RGBA", rgba.size, (*background, 255))
    return Image.alpha_composite(base, rgba).convert("RGB")


def _check_pixels(width: int, height: int) -> None:
    if width <= 0 or height <= 0:
        raise DecodeError("image", f"empty ({width}x{height} pixels)")
    if width * height > MAX_IMAGE_PIXELS:
        raise DecodeError("image", f"too large ({width}x{height} pixels; at most {MAX_IMAGE_PIXELS}, "
                                   "e.g. 4096x4096, are accepted)")


def decode_image(data: Any, channels: int, background: tuple[int, int, int] = (255, 255, 255),
                 ) -> torch.Tensor:
    """Encoded PNG/JPEG/WebP/GIF/BMP bytes -> uint8 (C, H, W), transparent pixels composited onto
    `background`. DecodeError on empty, truncated, unlisted, oversized or undecodable bytes; never another
    exception."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError("image", f"expected encoded image bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise DecodeError("image", "empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(bytes(data)), formats=IMAGE_FORMATS) as im:
            _check_pixels(im.width, im.height)  # from the header: no decompression bombs
            im.load()  # decodes the first frame fully: a truncated file fails here, not later
            _check_pixels(im.width, im.height)
            im = _flatten_alpha(im, background).convert("L" if channels == 1 else "RGB")
    except DecodeError:
        raise
    except Image.DecompressionBombError as e:
        raise DecodeError("image", f"too large ({e})") from None
    except UnidentifiedImageError:
        raise DecodeError("image", "not a recognised image format") from None  # IMAGE_FORMATS: in the docs
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise DecodeError("image", f"undecodable ({e})") from None
    except MemoryError:
        raise DecodeError("image", "undecodable (out of memory while decoding)") from None
    except Exception as e:  # any other failure of a Pillow plugin (struct.error, IndexError, ...)
        raise DecodeError("image", f"undecodable ({type(e).__name__}: {e})") from None
    arr = np.asarray(im, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)  # (C, H, W)


@functools.lru_cache(maxsize=8)
def _image_transforms(size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[Any, Any]:
    """(resize to size x size: uint8 -> uint8, scale + normalize: uint8 -> float32); either may be used
    alone (size 0: no resize; empty mean/std: no normalization)."""
    from torchvision.transforms import v2

    resize = v2.Resize((size, size), antialias=True) if size else None
    to_float = (v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])
                if mean else None)
    return resize, to_float


def image_pixels(values: Sequence[Any], cfg: ImagePreprocessConfig) -> tuple[np.ndarray, list[str | None]]:
    """Decode + resize a batch, kept as uint8: what the object store holds (4x smaller than float32).
    None entries are skipped (zeros). -> uint8 (N, C, H, W), errors."""
    background = background_rgb(cfg)
    resize, _ = _image_transforms(cfg.size, (), ())
    c, s = cfg.channels, cfg.size
    out = np.zeros((len(values), c, s, s), dtype=np.uint8)
    errors: list[str | None] = [None] * len(values)
    for i, v in enumerate(values):
        if v is None:
            continue
        try:
            img = decode_image(v, c, background)  # uint8 (C, h, w)
        except DecodeError as e:
            errors[i] = e.reason
            continue
        out[i] = (resize(img) if img.shape[1:] != (s, s) else img).numpy()  # uint8 (C, S, S)
    return out, errors


def normalize_images(pixels: torch.Tensor, present: torch.Tensor | None, mean: Sequence[float],
                     std: Sequence[float]) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 (N, C, H, W): scaled to [0, 1], then (x - mean) / std per channel.
    Rows where `present` (N,) is False stay zeros (a missing image). The one normalization: training's
    collate (mmfusion.data.pipeline.MMCollate) and serving (image_batch) both call it."""
    _, to_float = _image_transforms(0, tuple(mean), tuple(std))
    out = to_float(pixels)  # (N, C, H, W) float32
    if present is not None:
        out[~present] = 0.0
    return out


def image_batch(values: Sequence[Any], cfg: ImagePreprocessConfig) -> tuple[np.ndarray, list[str | None]]:
    """Decode + resize + normalize a batch (serving, profiling); None entries are skipped (zeros).
    -> float32 (N, C, H, W), errors."""
    mean, std = norm_stats(cfg)
    pixels, errors = image_pixels(values, cfg)
    present = torch.tensor([v is not None and e is None for v, e in zip(values, errors, strict=True)],
                           dtype=torch.bool)
    return normalize_images(torch.from_numpy(pixels), present, mean, std).numpy(), errors


def preprocess_image(data: bytes, cfg: ImagePreprocessConfig) -> np.ndarray:
    """One encoded image -> float32 (C, H, W). DecodeError if it cannot be decoded."""
    out, errors = image_batch([data], cfg)
    if errors[0] is not None:
        raise DecodeError("image", errors[0])
    return out[0]
