"""train_one_epoch times how long training blocks on the batch iterator (issue 15, acceptance 2: the worker
reports it as data_wait_s / data_first_wait_s; bench/ingest.py compares it with the epoch's time)."""

from __future__ import annotations

import time

import torch
from tests.unit.test_train_loop import Toy  # a linear toy over batch["image"]: (B, 4) -> (B, 3)

from mmfusion.train.loop import build_optimizer, train_one_epoch


def batches(n: int, first_delay: float = 0.0, delay: float = 0.0):
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        time.sleep(first_delay if i == 0 else delay)  # a pipeline starting up, then one that lags
        x = torch.randn(8, 4, generator=g)
        yield {"image": x, "label": x[:, :3].argmax(-1)}


def test_the_wait_for_batches_is_counted_and_the_first_batch_apart():
    model = Toy()
    opt = build_optimizer(model.parameters(), "sgd", 0.01, 0.0)
    stats = train_one_epoch(model, batches(4, first_delay=0.05, delay=0.02), opt, None, torch.device("cpu"))
    assert stats.samples == 32
    assert stats.data_first_wait_s >= 0.05
    assert stats.data_wait_s >= stats.data_first_wait_s + 3 * 0.02  # the last next() (StopIteration) too
    assert stats.data_wait_s <= stats.seconds


def test_batches_already_in_memory_barely_wait():
    model = Toy()
    opt = build_optimizer(model.parameters(), "sgd", 0.01, 0.0)
    sleepy = train_one_epoch(model, batches(3, delay=0.02), opt, None, torch.device("cpu"))
    ready = train_one_epoch(model, list(batches(3)), opt, None, torch.device("cpu"))
    assert ready.data_wait_s < sleepy.data_wait_s  # the list waits on nothing; the generator slept 40 ms
    empty = train_one_epoch(model, [], opt, None, torch.device("cpu"))
    assert empty.samples == 0 and empty.data_first_wait_s == empty.data_wait_s
