"""NextEpoch: a streamed epoch opened ahead of time (while the loop validates), then consumed whole."""

from __future__ import annotations

import threading

import pytest

from mmfusion.data.local_shard import NextEpoch
from mmfusion.errors import DataError


def test_stream_opens_and_first_batch_arrives_before_the_epoch_is_consumed():
    first_pulled = threading.Event()

    def stream():
        for i in range(5):
            if i == 0:
                first_pulled.set()
            yield {"i": i}

    ahead = NextEpoch(stream)
    assert first_pulled.wait(timeout=10)  # opened in the background, nobody consumed anything yet
    assert [b["i"] for b in ahead.batches()] == [0, 1, 2, 3, 4]  # every batch once, in order


def test_empty_stream_and_errors_reach_the_consumer():
    assert list(NextEpoch(lambda: iter(())).batches()) == []

    def broken():
        raise DataError("shard unreadable")
        yield  # a generator

    with pytest.raises(DataError, match="shard unreadable"):
        list(NextEpoch(broken).batches())

    def late():
        yield {"i": 0}
        raise DataError("row 7 undecodable")

    got = []
    with pytest.raises(DataError, match="row 7"):
        for b in NextEpoch(late).batches():
            got.append(b)
    assert got == [{"i": 0}]
