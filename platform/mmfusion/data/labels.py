"""Labels: the one normalization of a label value to the class-name string stored in labels lists, and their
order. Readers (any column type) and the Preprocessor (labels given in a batch) both use `label_key`."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any


def label_key(value: Any) -> str | None:
    """A label value as the string stored in labels lists: 3, 3.0, np.int64(3) and "3" all map to "3";
    True to "true"; None and NaN to None (a missing label)."""
    if value is None:
        return None
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy scalars
        value = value.item()
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def sort_labels(values: Iterable[str | None]) -> list[str]:
    """Sorted unique labels: numerically when every label is an integer, else as strings."""
    uniq = {v for v in values if v is not None}
    if uniq and all(re.fullmatch(r"[+-]?\d+", v) for v in uniq):
        return sorted(uniq, key=lambda v: (int(v), v))
    return sorted(uniq)
