"""What the model sees: input shapes derived from the data config (see mmfusion.data.preprocess.input_spec).

The collated batch contract (torch tensors, a dict keyed by modality):
    "image":     float32 (B, C, H, W)   normalized pixels
    "text":      int64   (B, L)         token ids, padded with pad_id
    "text_mask": int64   (B, L)         1 for real tokens, 0 for padding
    "audio":     float32 (B, 1, F, T)   log-mel or MFCC frames
    "present":   bool    (B, M)         modality present, columns in InputSpec.modalities order
    "label":     int64   (B,)           class index (absent at inference)
Only the configured modalities appear. A missing modality has zeros in its tensor and False in "present".
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class InputSpec:
    modalities: tuple[str, ...]  # canonical order: image, text, audio (those configured)
    image_shape: tuple[int, int, int] = (1, 28, 28)  # (C, H, W)
    vocab_size: int = 259
    pad_id: int = 0
    max_text_len: int = 32
    audio_shape: tuple[int, int, int] = (1, 40, 101)  # (1, F, T)
