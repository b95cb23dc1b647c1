"""What the model deployments answer the ingress: plain dataclasses of numpy arrays and strings. They live
apart from the torch code (engine.py) because unpickling a result imports its class's module, and the ingress
must stay free of torch."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Encoded:
    """One row's encoder output: an embedding, or why the input could not be used."""

    embedding: np.ndarray | None = None  # float32 (D,)
    error: str | None = None  # e.g. "not a recognised image format"
    status: int = 400  # 400: undecodable bytes; 422: decodable but unusable (a silent clip)
    warning: str | None = None  # the input was cut to the model's limits (truncation is not an error)


@dataclass
class Predicted:
    """One row's prediction, or the first input error (`modality` = the field at fault)."""

    probabilities: np.ndarray | None = None  # float32 (K,)
    error: str | None = None
    modality: str | None = None
    status: int = 400
    truncated: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
