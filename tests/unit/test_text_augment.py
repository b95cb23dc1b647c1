"""data.text.augment_typo_rate: character typos on the train split's text only, seeded, validated."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from mmfusion.config import DataConfig, validate_config
from mmfusion.data.pipeline import use_augmented
from mmfusion.data.preprocessor import AUG_KEYS, Preprocessor
from mmfusion.data.text import augment_typos
from mmfusion.errors import ConfigError

WORDS = ["seven", "dreizehn", "quatre", "neun", "tres", "ocho", "zwei", "cinque"] * 4


def _cfg(rate: float) -> DataConfig:
    return DataConfig(path="x", modalities=["text"], text={"augment_typo_rate": rate, "max_length": 16})


def _batch(splits: list[str]) -> dict[str, Any]:
    n = len(splits)
    return {"text": np.array(WORDS[:n], dtype=object), "split": np.array(splits, dtype=object),
            "id": np.array([f"row{i}" for i in range(n)], dtype=object),
            "label": np.array(["1"] * n, dtype=object)}


@pytest.mark.parametrize("rate", [-0.1, 1.5])
def test_rate_outside_0_1_is_a_config_error(rate: float) -> None:
    with pytest.raises(ConfigError, match="augment_typo_rate"):
        validate_config({"data": {"path": "x", "text": {"augment_typo_rate": rate}}})
    assert validate_config({"data": {"path": "x", "text": {"augment_typo_rate": 1.0}}}).data.text


def test_augment_typos_is_seeded_by_row_and_rate_zero_changes_nothing() -> None:
    ids = [f"r{i}" for i in range(len(WORDS))]
    noisy = augment_typos(WORDS, ids, 0.3, seed=0)
    assert noisy == augment_typos(WORDS, ids, 0.3, seed=0)  # the same typos on every run
    assert noisy != WORDS and noisy != augment_typos(WORDS, ids, 0.3, seed=1)
    assert all(noisy)  # never empty: an empty text would be a missing modality
    # a row's typos depend on its id, not on its batch-mates
    assert augment_typos(WORDS[3:5], ids[3:5], 0.3, seed=0) == noisy[3:5]
    assert augment_typos(WORDS, ids, 0.0, seed=0) == WORDS
    assert augment_typos([None, "x"], ["a", "b"], 0.5, seed=0)[0] is None


def test_preprocessor_augments_train_rows_only() -> None:
    splits = ["train"] * 16 + ["val"] * 8 + ["test"] * 8
    out = Preprocessor(_cfg(0.3), labels=["1"], augment_seed=0)(_batch(splits))
    assert not any(out["error"])
    aug, clean = out[AUG_KEYS["text"]], out["text"]
    train = np.array([s == "train" for s in splits])
    changed = (aug != clean).any(axis=1)  # (N,)
    assert changed[train].sum() >= 8  # most train words got a typo at 0.3 per character
    assert not changed[~train].any()  # val and test rows: the clean tokens
    np.testing.assert_array_equal(out[AUG_KEYS["text_mask"]] > 0, aug != 0)  # mask matches the new tokens
    again = Preprocessor(_cfg(0.3), labels=["1"], augment_seed=0)(_batch(splits))
    np.testing.assert_array_equal(again[AUG_KEYS["text"]], aug)  # deterministic from the seed


@pytest.mark.parametrize(("rate", "seed"), [(0.0, 0), (0.3, None)])
def test_rate_zero_or_no_seed_adds_no_columns_and_changes_nothing(rate: float, seed: int | None) -> None:
    splits = ["train"] * 8
    out = Preprocessor(_cfg(rate), labels=["1"], augment_seed=seed)(_batch(splits))
    base = Preprocessor(_cfg(0.0), labels=["1"])(_batch(splits))
    assert not set(AUG_KEYS.values()) & set(out)
    np.testing.assert_array_equal(out["text"], base["text"])
    np.testing.assert_array_equal(out["text_mask"], base["text_mask"])


class _Columns:
    """The two Ray Dataset calls use_augmented makes, over a plain dict of columns."""

    def __init__(self, cols: dict[str, str]) -> None:
        self.cols = cols

    def drop_columns(self, names: list[str]) -> _Columns:
        return _Columns({k: v for k, v in self.cols.items() if k not in names})

    def rename_columns(self, names: dict[str, str]) -> _Columns:
        return _Columns({names.get(k, k): v for k, v in self.cols.items()})


def test_pipeline_keeps_augmented_tokens_for_train_and_clean_ones_elsewhere() -> None:
    rows = _Columns({"text": "clean", "text_mask": "clean mask", "text_aug": "noisy",
                     "text_aug_mask": "noisy mask", "label": "y"})
    train = use_augmented(rows, "train", augmented=True).cols  # type: ignore[arg-type]
    assert train == {"text": "noisy", "text_mask": "noisy mask", "label": "y"}
    for split in ("val", "test"):
        assert use_augmented(rows, split, augmented=True).cols == {  # type: ignore[arg-type]
            "text": "clean", "text_mask": "clean mask", "label": "y"}
    assert use_augmented(rows, "train", augmented=False) is rows  # type: ignore[arg-type]
