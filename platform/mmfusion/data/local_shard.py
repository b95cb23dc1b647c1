"""A Train worker's shard of a materialized split, kept in the worker's own memory after its first pass.

With `data.cache` memory the preprocessed splits sit in the object store, and every epoch would still run Ray
Data's streaming split (a coordinator actor, prefetch threads, block fetches) to hand each rank the same
tensors again: a few percent of a 2-core machine that plain DDP spends on the model (bench/train_overhead.py).
LocalShard streams the first epoch from Ray Data as before and keeps the numpy columns it saw; later epochs
shuffle and slice that copy in place, with the collate step (MMCollate) of the streamed path.

Every rank keeps exactly the rows its streaming split gave it (equal row counts: DDP ranks step alike); later
epochs reshuffle them within the rank, as the local shuffle buffer does. The driver turns this on only for
materialized splits that fit a memory budget (trainer.local_shard_bytes); streamed data (cache none, global
shuffle) always reads through Ray Data.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from mmfusion.batch import InputSpec
from mmfusion.data.pipeline import EMB_SUFFIX, MMCollate, iter_torch_batches

log = logging.getLogger(__name__)


class LocalShard:
    """Batches of one rank's shard: epoch 1 from `shard` (a Ray Data iterator), later epochs from memory."""

    def __init__(self, shard: Any, spec: InputSpec | None, device: torch.device) -> None:
        self.shard = shard
        self.collate = MMCollate(spec)
        self.device = device
        self.columns: dict[str, np.ndarray] | None = None  # name -> (rows, ...) once the first pass ended

    @property
    def rows(self) -> int:
        return 0 if not self.columns else len(next(iter(self.columns.values())))

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for v in (self.columns or {}).values())

    def batches(self, batch_size: int, shuffle_seed: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Collated torch batches on the device; a new order per `shuffle_seed` (None: the stored order)."""
        if self.columns is None:
            return self._first_pass(batch_size, shuffle_seed)
        return self._from_memory(batch_size, shuffle_seed)

    def _first_pass(self, batch_size: int, shuffle_seed: int | None) -> Iterator[dict[str, torch.Tensor]]:
        parts: dict[str, list[np.ndarray]] = {}
        kwargs: dict[str, Any] = {}
        if shuffle_seed is not None:  # the streamed path's shuffle buffer (pipeline.iter_torch_batches)
            kwargs = {"local_shuffle_buffer_size": max(4 * batch_size, 256),
                      "local_shuffle_seed": shuffle_seed}
        for batch in self.shard.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=1,
                                             **kwargs):
            kept = {k: v for k, v in batch.items() if k in MMCollate.DTYPES or k.endswith(EMB_SUFFIX)}
            for k, v in kept.items():
                parts.setdefault(k, []).append(v)  # concatenated (copied) once the pass ends
            yield self._to_device(self.collate(kept))
        self.columns = {k: np.concatenate(v) for k, v in parts.items()}
        log.debug("kept %d rows (%.1f MiB) of this rank's shard in memory", self.rows, self.nbytes / 2**20)

    def _from_memory(self, batch_size: int, shuffle_seed: int | None) -> Iterator[dict[str, torch.Tensor]]:
        assert self.columns is not None
        n = self.rows
        order = np.random.default_rng(shuffle_seed).permutation(n) if shuffle_seed is not None else None
        for start in range(0, n, batch_size):
            if order is None:
                batch = {k: v[start:start + batch_size] for k, v in self.columns.items()}
            else:
                idx = np.sort(order[start:start + batch_size])  # sorted: sequential reads within the batch
                batch = {k: v[idx] for k, v in self.columns.items()}
            yield self._to_device(self.collate(batch))

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.device.type != "cuda":
            return batch
        return {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in batch.items()}


def shard_batches(shard: Any, local: LocalShard | None, batch_size: int, spec: InputSpec | None,
                  shuffle_seed: int | None, device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """One epoch's batches: from the rank's LocalShard when it has one, else streamed through Ray Data."""
    if local is not None:
        return local.batches(batch_size, shuffle_seed)
    return iter_torch_batches(shard, batch_size, spec, shuffle_seed=shuffle_seed,
                              pin_memory=device.type == "cuda")  # batches arrive on `device`


class NextEpoch:
    """A streamed epoch started ahead: a thread opens its batch stream and waits for the first batch while the
    loop evaluates and checkpoints the epoch before, so the stream's start-up (read tasks, a fresh
    preprocessing actor pool: seconds per epoch with data.cache none) overlaps them instead of the training
    steps. Every rank starts the same epoch at the same point, so Ray's split barrier lines up.

    `batches()` hands the epoch over; its first next() waits for the thread (the loop counts that wait as
    data wait, as it would count a stream started then)."""

    _END = object()

    def __init__(self, start: Callable[[], Iterator[dict[str, torch.Tensor]]]) -> None:
        self._start = start
        self._out: tuple[Iterator | None, Any, BaseException | None] = (None, self._END, None)
        self._thread = threading.Thread(target=self._run, name="mmfusion-next-epoch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            it = self._start()
            self._out = (it, next(it, self._END), None)
        except BaseException as e:  # raised in the training thread, where the epoch is consumed
            self._out = (None, self._END, e)

    def batches(self) -> Iterator[dict[str, torch.Tensor]]:
        self._thread.join()
        it, first, err = self._out
        if err is not None:
            raise err
        if first is not self._END:
            yield first
            yield from it  # type: ignore[misc]
