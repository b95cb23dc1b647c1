"""Text preprocessing: str -> token ids and mask, with the builtin UTF-8 byte vocabulary or a Hugging Face
tokenizer. `text_batch` is the one kernel; Ray Data (via the Preprocessor) and Serve (the encoder replicas)
both call it. transformers is imported only when a Hugging Face tokenizer is loaded.

    text str -> builtin byte vocabulary or a Hugging Face tokenizer -> int64 ids (L,), int64 mask (L,)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from mmfusion.config import TextPreprocessConfig
from mmfusion.errors import ConfigError, DecodeError


class Tokenizer(Protocol):
    vocab_size: int
    pad_id: int

    def encode(self, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> ids int64 (N, L), mask int64 (N, L), truncated bool (N,), with L = max_length."""
        ...


class ByteTokenizer:
    """The builtin vocabulary: UTF-8 bytes. ids: 0 pad, 1 bos/cls, 2 unk (unused), byte b -> b + 3."""

    PAD, BOS, UNK, OFFSET = 0, 1, 2, 3
    vocab_size = 256 + OFFSET  # 259
    pad_id = PAD

    def __init__(self, lowercase: bool = True) -> None:
        self.lowercase = lowercase

    def encode(self, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = len(texts)
        ids = np.zeros((n, max_length), dtype=np.int64)  # (N, L)
        truncated = np.zeros(n, dtype=bool)  # (N,)
        for i, t in enumerate(texts):
            raw = (t.lower() if self.lowercase else t).encode("utf-8")
            row = np.frombuffer(raw, dtype=np.uint8).astype(np.int64) + self.OFFSET
            k = min(len(row), max_length - 1)
            truncated[i] = len(row) > k
            ids[i, 0] = self.BOS
            ids[i, 1 : k + 1] = row[:k]
        mask = (ids != self.PAD).astype(np.int64)  # (N, L)
        return ids, mask, truncated


class HfTokenizer:
    """A Hugging Face tokenizer (hub name, local folder or `pkg:PACKAGE/FOLDER`), padded/truncated to a fixed
    length."""

    def __init__(self, name_or_path: str) -> None:
        from transformers import AutoTokenizer

        from mmfusion.models.encoders import resolve_pretrained  # `pkg:` references, as for the encoders

        try:
            self.tok = AutoTokenizer.from_pretrained(resolve_pretrained(name_or_path))
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"data.text.tokenizer={name_or_path!r}: cannot load a Hugging Face tokenizer ({e}); "
                "use 'builtin' or a local folder written by save_pretrained"
            ) from None
        pad = self.tok.pad_token_id
        if pad is None:  # GPT-style tokenizers: pad with EOS, the mask hides it anyway
            pad = self.tok.eos_token_id
            if pad is None:
                raise ConfigError(f"data.text.tokenizer={name_or_path!r} has neither a pad nor an eos token")
            self.tok.pad_token = self.tok.eos_token
        self.pad_id = int(pad)
        self.vocab_size = len(self.tok)

    def encode(self, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        texts = list(texts)
        if not texts:
            empty = np.zeros((0, max_length), dtype=np.int64)
            return empty, empty.copy(), np.zeros(0, dtype=bool)
        enc = self.tok(texts, max_length=max_length, truncation=True, padding="max_length",
                       return_tensors="np")
        full = self.tok(texts, truncation=False)["input_ids"]  # lengths before truncation
        truncated = np.array([len(f) > max_length for f in full], dtype=bool)
        ids = enc["input_ids"].astype(np.int64)  # (N, L)
        mask = enc["attention_mask"].astype(np.int64)  # (N, L)
        return ids, mask, truncated


def load_tokenizer(cfg: TextPreprocessConfig) -> Tokenizer:
    """`builtin` -> ByteTokenizer; else AutoTokenizer.from_pretrained(a name, a path or a `pkg:` ref)."""
    if cfg.tokenizer == "builtin":
        return ByteTokenizer(lowercase=cfg.lowercase)
    return _hf_tokenizer(cfg.tokenizer)


@functools.lru_cache(maxsize=4)
def _hf_tokenizer(name_or_path: str) -> HfTokenizer:
    return HfTokenizer(name_or_path)


def _as_text(value: Any) -> str:
    """A text field -> str, or DecodeError. bytes are decoded strictly as UTF-8."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            reason = f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at position {e.start})"
            raise DecodeError("text", reason) from None
    if not isinstance(value, str):
        raise DecodeError("text", f"expected a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # lone surrogates, e.g. from surrogateescape-decoded bytes
        raise DecodeError("text", f"not valid UTF-8 (undecodable character at position {e.start})") from None
    return value


def split_characters(text: str) -> str:
    """data.text.split_characters: "Zeven acht" -> "Z e v e n a c h t" (each character a word of its own,
    whitespace dropped)."""
    return " ".join(ch for ch in text if not ch.isspace())


def text_batch(values: Sequence[Any], cfg: TextPreprocessConfig, tokenizer: Tokenizer,
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str | None]]:
    """Tokenize a batch (characters split first with data.text.split_characters); None entries are skipped
    (zeros). -> ids (N, L), mask (N, L), truncated (N,), errors."""
    n, L = len(values), cfg.max_length
    ids = np.full((n, L), tokenizer.pad_id, dtype=np.int64)
    mask = np.zeros((n, L), dtype=np.int64)
    truncated = np.zeros(n, dtype=bool)
    errors: list[str | None] = [None] * n
    rows, texts = [], []
    for i, v in enumerate(values):
        if v is None:
            continue
        try:
            text = _as_text(v)
            texts.append(split_characters(text) if cfg.split_characters else text)
            rows.append(i)
        except DecodeError as e:
            errors[i] = e.reason
    if rows:
        t_ids, t_mask, t_trunc = tokenizer.encode(texts, L)
        ids[rows], mask[rows], truncated[rows] = t_ids, t_mask, t_trunc
    return ids, mask, truncated, errors


def augment_typos(values: Sequence[Any], ids: Sequence[Any], rate: float, seed: int) -> list[Any]:
    """Train-time augmentation (data.text.augment_typo_rate): each text with character typos at `rate` per
    character, by the kernel `mmfusion evaluate --robustness` uses (mmfusion.evaluate.noise.text_typos:
    deleted, replaced, doubled or swapped), from a generator seeded by (seed, rate, row id): the same typos
    on every run with this seed, whatever the batching. None stays None; rate 0 returns the values as they
    are."""
    from mmfusion.evaluate.noise import corrupt  # numpy only

    return corrupt(values, [str(i) for i in ids], "text_typos", rate, seed)


def preprocess_text(text: str, cfg: TextPreprocessConfig, tokenizer: Tokenizer,
                    ) -> tuple[np.ndarray, np.ndarray, bool]:
    """One text -> ids int64 (L,), mask int64 (L,), truncated flag (Serve tells the client).
    DecodeError if bad."""
    ids, mask, truncated, errors = text_batch([text], cfg, tokenizer)
    if errors[0] is not None:
        raise DecodeError("text", errors[0])
    return ids[0], mask[0], bool(truncated[0])
