"""The batch contract: the one definition of the modalities and of the keys, dtypes and shapes of a batch.

A model-ready batch is a dict keyed by name (numpy from preprocessing, torch after collation):
    "image":     float32 (B, C, H, W)   normalized pixels (preprocessed and stored as uint8 (B, C, H, W);
                                        the collate step normalizes them with InputSpec.image_mean/std)
    "text":      int64   (B, L)         token ids, padded with pad_id
    "text_mask": int64   (B, L)         1 for real tokens, 0 for padding
    "audio":     float32 (B, 1, F, T)   log-mel or MFCC frames
    "present":   bool    (B, M)         modality present, columns in InputSpec.modalities order
    "label":     int64   (B,)           class index (absent at inference)
Only the configured modalities appear. A missing modality has zeros in its tensors and False in "present".

No heavy imports here (no torch, numpy or pyarrow): config, serving's ingress and the data readers all use it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Modality = Literal["image", "text", "audio"]
# canonical order: presence-mask columns, encoders and request fields follow it
MODALITIES: tuple[Modality, ...] = ("image", "text", "audio")
MEDIA: tuple[Modality, ...] = ("image", "audio")  # carried as encoded bytes (files, Parquet binary, base64)

# The batch keys each modality's encoder reads; the first is its main tensor.
INPUT_KEYS: dict[str, tuple[str, ...]] = {
    "image": ("image",),
    "text": ("text", "text_mask"),
    "audio": ("audio",),
}
PRESENT = "present"
LABEL = "label"

# dtype of every batch key after collation, as numpy/torch dtype names ("float32" is both np.float32 and
# torch.float32)
DTYPES: dict[str, str] = {
    "image": "float32",  # (B, C, H, W)
    "text": "int64",  # (B, L)
    "text_mask": "int64",  # (B, L)
    "audio": "float32",  # (B, 1, F, T)
    PRESENT: "bool",  # (B, M)
    LABEL: "int64",  # (B,)
}
# dtype of the keys as preprocessed (Ray Data's Preprocessor output, what the object store holds) where it
# differs from DTYPES: images stay uint8 until the worker, 4x smaller than float32
STORED_DTYPES: dict[str, str] = {**DTYPES, "image": "uint8"}


def input_keys(modalities: Iterable[str]) -> tuple[str, ...]:
    """The keys a model built for `modalities` needs in every batch: its tensors, then "present"."""
    mods = set(modalities)
    return (*(k for m in MODALITIES if m in mods for k in INPUT_KEYS[m]), PRESENT)


@dataclass(frozen=True)
class InputSpec:
    """What the model is built for: input shapes and vocabulary, derived from the data config
    (mmfusion.data.preprocessor.input_spec)."""

    modalities: tuple[str, ...]  # canonical order: image, text, audio (those configured)
    image_shape: tuple[int, int, int] = (1, 28, 28)  # (C, H, W)
    image_mean: tuple[float, ...] = (0.5,)  # per channel (C,) or one value: uint8 / 255 -> (x - mean) / std
    image_std: tuple[float, ...] = (0.5,)
    vocab_size: int = 259
    pad_id: int = 0
    max_text_len: int = 32
    audio_shape: tuple[int, int, int] = (1, 40, 101)  # (1, F, T)
