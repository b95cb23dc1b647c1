"""Dynamic batching knobs (set from a Serve config's `user_config`) and the batch-size counters every batched
deployment keeps, so tests and operators can see that batching happens. Pure Python: no Ray, no torch."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class BatchConfig(BaseModel):
    """A batched deployment's `user_config` in serve/*.yaml (applied in `reconfigure`, no restart needed).

    Its defaults are the only batch defaults: the `@serve.batch` decorators start from them, and a deployment
    whose Serve config has no user_config keeps them.

    `max_ongoing_requests` must be at least `max_batch_size`: Serve never hands a replica more requests at
    once, so a larger batch could never form (serve/*.yaml are checked for this by the tests).
    """

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(16, ge=1, le=4096)  # rows per forward pass
    batch_wait_timeout_s: float = Field(0.005, ge=0.0, le=10.0)  # how long a partial batch waits for company


@dataclass
class BatchStats:
    """How many rows each batch had: a histogram plus totals. One instance per replica."""

    sizes: Counter[int] = field(default_factory=Counter)

    def add(self, n: int) -> None:
        self.sizes[int(n)] += 1

    @property
    def batches(self) -> int:
        return sum(self.sizes.values())

    @property
    def rows(self) -> int:
        return sum(k * v for k, v in self.sizes.items())

    def as_dict(self) -> dict[str, Any]:
        """{"batches", "rows", "max_batch", "mean_batch", "histogram": {size: count}} (JSON-ready)."""
        b, r = self.batches, self.rows
        return {
            "batches": b,
            "rows": r,
            "max_batch": max(self.sizes, default=0),
            "mean_batch": round(r / b, 3) if b else 0.0,
            "histogram": {str(k): v for k, v in sorted(self.sizes.items())},
        }
