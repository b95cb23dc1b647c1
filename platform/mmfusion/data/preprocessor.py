"""The batch assembler: raw record batches -> model-ready numpy batches (the contract in mmfusion.batch).

`Preprocessor` runs the per-modality kernels (mmfusion.data.image, .text, .audio) over a batch, indexes the
labels and marks undecodable rows with an "error" string instead of failing, so one bad record never fails a
batch. Ray Data runs it in map_batches actors, evaluation in-process; Serve calls the same kernels.
No Ray here.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from mmfusion.batch import INPUT_KEYS, InputSpec
from mmfusion.config import DataConfig
from mmfusion.data.audio import (
    audio_batch,
    audio_num_features,
    audio_num_frames,
    check_stats,
    feature_transform,
)
from mmfusion.data.image import background_rgb, image_batch, image_pixels, norm_stats
from mmfusion.data.labels import label_key
from mmfusion.data.text import Tokenizer, augment_typos, load_tokenizer, text_batch

META_COLUMNS = ("id", "split", "source", "row")  # bookkeeping columns passed through Preprocessor untouched
# data.text.augment_typo_rate: the train rows' augmented tokens, beside the clean ones until the split is
# final (the pipeline then keeps one pair per split: mmfusion.data.pipeline.use_augmented)
AUG_KEYS = {"text": "text_aug", "text_mask": "text_aug_mask"}
# the error of a row that is fine but has none of the configured modalities (a single-modality run over rows
# that lack it): skipped, and not counted towards data.max_bad_fraction
EMPTY_ROW = "record: none of the configured modalities"


def input_spec(cfg: DataConfig, tokenizer: Tokenizer | None = None) -> InputSpec:
    """Shapes, vocabulary size and pad id the model is built for (see mmfusion.batch.InputSpec)."""
    mods = tuple(cfg.modalities)
    kwargs: dict[str, Any] = {}
    if "image" in mods:
        mean, std = norm_stats(cfg.image)  # a mean/std mismatch is a config error now, not in an actor later
        background_rgb(cfg.image)
        kwargs.update(image_shape=(cfg.image.channels, cfg.image.size, cfg.image.size),
                      image_mean=tuple(mean), image_std=tuple(std))  # applied by the collate step
    if "text" in mods:
        tok = tokenizer if tokenizer is not None else load_tokenizer(cfg.text)
        kwargs.update(vocab_size=int(tok.vocab_size), pad_id=int(tok.pad_id),
                      max_text_len=cfg.text.max_length)
    if "audio" in mods:
        a = cfg.audio
        feature_transform(a.features, a.sample_rate, a.n_fft, a.hop_length, a.n_mels, a.n_mfcc)  # validates
        check_stats(a)
        kwargs["audio_shape"] = (1, audio_num_features(a), audio_num_frames(a))
    return InputSpec(modalities=mods, **kwargs)


def _column(batch: dict[str, Any], name: str, n: int) -> list[Any]:
    col = batch.get(name)
    if col is None:
        return [None] * n
    return [None if (isinstance(v, float) and math.isnan(v)) else v for v in col]


class Preprocessor:
    """Raw record batch -> model-ready numpy batch. Callable class: Ray Data map_batches actors and Serve.

    In:  "image" bytes|None, "text" str|bytes|None, "audio" bytes|None, optional "label", "id", "error" (a
         reason found by the reader, e.g. a missing file: the row is passed through as rejected), and the
         bookkeeping columns "split", "source", "row", which are passed through.
    Out: "image" f32 (N,C,H,W) (uint8 with uint8_images: MMCollate normalizes it), "text" i64 (N,L),
         "text_mask" i64 (N,L), "audio" f32 (N,1,F,T), "present" bool (N,M), "label" i64 (N,) (index into
         labels; -1 when labels is None), "id" (N,),
         "error" (N,) str: "" for a good row, else "<modality>: <reason>". Only configured modalities appear;
         a missing (None) or empty-text field is a missing modality: zeros and present=False. A row with none
         of them present is an error.
         With augment_seed (training, data.text.augment_typo_rate > 0) also "text_aug", "text_aug_mask": the
         tokens of the text with typos (data.text.augment_typos) for rows whose "split" is "train", the clean
         tokens for the others.
    """

    def __init__(self, cfg: DataConfig, labels: list[str] | None = None, num_threads: int | None = None,
                 uint8_images: bool = False, augment_seed: int | None = None) -> None:
        """uint8_images: leave images as decoded + resized uint8 pixels (the Ray Data pipeline: the object
        store then holds 1 byte per pixel, and the collate step normalizes them in the worker).
        augment_seed: the experiment seed, to add the augmented text columns (build_datasets, for training
        only); None, or data.text.augment_typo_rate 0, adds nothing."""
        if num_threads is not None:  # Ray Data actors: one thread each, the pool provides the parallelism
            torch.set_num_threads(num_threads)
        self.cfg = cfg
        self.uint8_images = uint8_images
        self.modalities = tuple(cfg.modalities)
        self.tokenizer = load_tokenizer(cfg.text) if "text" in self.modalities else None
        rate = cfg.text.augment_typo_rate
        self.augment_seed = augment_seed if rate > 0 and self.tokenizer is not None else None
        self.spec = input_spec(cfg, self.tokenizer)
        self.labels = list(labels) if labels is not None else None
        self._label_index = {lab: i for i, lab in enumerate(self.labels or [])}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = _batch_len(batch)
        errors: list[str] = [str(e) if e else "" for e in _column(batch, "error", n)]
        present = np.zeros((n, len(self.modalities)), dtype=bool)
        out: dict[str, np.ndarray] = {}
        for j, m in enumerate(self.modalities):
            values = _column(batch, m, n)
            if m == "text":
                values = [None if (isinstance(v, (str, bytes)) and len(v) == 0) else v for v in values]
            values = [None if errors[i] else v for i, v in enumerate(values)]  # skip already-rejected rows
            if m == "image":
                kernel = image_pixels if self.uint8_images else image_batch  # uint8 | normalized float32
                out["image"], errs = kernel(values, self.cfg.image)
            elif m == "audio":
                out["audio"], errs = audio_batch(values, self.cfg.audio)
            else:
                assert self.tokenizer is not None
                out["text"], out["text_mask"], _, errs = text_batch(values, self.cfg.text, self.tokenizer)
                if self.augment_seed is not None:
                    out[AUG_KEYS["text"]], out[AUG_KEYS["text_mask"]] = self._augmented(
                        batch, values, out["text"], out["text_mask"])
            for i, (v, e) in enumerate(zip(values, errs, strict=True)):
                if e is not None:
                    errors[i] = errors[i] or f"{m}: {e}"
                present[i, j] = v is not None and e is None
        labels = self._labels(batch, n, errors)
        for i in range(n):
            if not errors[i] and not present[i].any():
                errors[i] = f"{EMPTY_ROW} ({', '.join(self.modalities)}) is present"
        bad = np.array([bool(e) for e in errors], dtype=bool)
        if bad.any():  # rejected rows carry no data: zeros everywhere, nothing present
            for m in self.modalities:
                for k in INPUT_KEYS[m]:
                    out[k][bad] = 0
            for k in AUG_KEYS.values():
                if k in out:
                    out[k][bad] = 0
            present[bad] = False
            labels[bad] = -1
        out["present"] = present
        out["label"] = labels
        ids = batch.get("id")
        out["id"] = np.array([str(i) for i in range(n)] if ids is None else [str(x) for x in ids],
                             dtype=object)
        for k in META_COLUMNS[1:]:
            if k in batch:
                out[k] = np.asarray(batch[k])
        out["error"] = np.array(errors, dtype=object)
        return out

    def _augmented(self, batch: dict[str, Any], values: list[Any], tokens: np.ndarray, mask: np.ndarray,
                   ) -> tuple[np.ndarray, np.ndarray]:
        """Tokens (N, L) and mask (N, L) of the train rows' text with typos; the other rows keep their clean
        `tokens` / `mask` (copied, not tokenized again)."""
        assert self.tokenizer is not None and self.augment_seed is not None
        n = len(values)
        splits = _column(batch, "split", n)
        ids = _column(batch, "id", n) if batch.get("id") is not None else [str(i) for i in range(n)]
        train = [i for i in range(n) if splits[i] == "train" and values[i] is not None]
        tokens, mask = tokens.copy(), mask.copy()
        if train:
            noisy = augment_typos([values[i] for i in train], [ids[i] for i in train],
                                  self.cfg.text.augment_typo_rate, self.augment_seed)
            tokens[train], mask[train], _, _ = text_batch(noisy, self.cfg.text, self.tokenizer)
        return tokens, mask

    def _labels(self, batch: dict[str, Any], n: int, errors: list[str]) -> np.ndarray:
        out = np.full(n, -1, dtype=np.int64)  # (N,)
        if self.labels is None or "label" not in batch:
            return out
        for i, v in enumerate(_column(batch, "label", n)):
            key = label_key(v)
            if key is None:
                errors[i] = errors[i] or "label: missing"
            elif key in self._label_index:
                out[i] = self._label_index[key]
            else:
                errors[i] = errors[i] or (f"label: unknown label {key!r} "
                                          f"(not among the {len(self.labels)} training labels)")
        return out


def _batch_len(batch: dict[str, Any]) -> int:
    for v in batch.values():
        if v is not None:
            return len(v)
    return 0
