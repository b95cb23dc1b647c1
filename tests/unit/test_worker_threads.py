"""train.num_threads unset: each worker gets as many torch threads as CPUs it gets, and on one machine with
materialized data the workers share all its cores (issue 15: the second core idled)."""

from __future__ import annotations

import os

import pytest

from mmfusion.train.trainer import _streams, worker_threads


@pytest.fixture
def two_cores(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)


def test_one_machine_with_materialized_data_uses_every_core(two_cores):
    assert worker_threads(1, 1.0, embedded=True, data_streams=False) == 2  # not 1 thread and an idle core
    assert worker_threads(2, 1.0, embedded=True, data_streams=False) == 1  # 2 workers x 1 thread
    assert worker_threads(3, 0.5, embedded=True, data_streams=False) == 1  # never 0


def test_streaming_data_or_a_cluster_get_the_reserved_cpus(two_cores):
    assert worker_threads(1, 1.0, embedded=True, data_streams=True) == 1  # the pool keeps the other core
    assert worker_threads(1, 4.0, embedded=False, data_streams=False) == 4  # a cluster node: its reservation
    assert worker_threads(1, 0.5, embedded=False, data_streams=False) == 1


def test_only_datasets_that_are_not_materialized_stream():
    assert not _streams({"train": None, "val": None})
    assert _streams({"train": object()})  # e.g. a lazy dataset (data.cache=none, data.shuffle=global)
