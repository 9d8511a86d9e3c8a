"""Reading ahead: results in order, the next read overlapping the caller's work, errors where they belong."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from mitoscope.readahead import ReadAhead, map_ahead


def test_results_come_in_order_and_the_next_read_runs_while_the_caller_works():
    started = {i: threading.Event() for i in range(4)}

    def work(item: int) -> int:
        started[item].set()
        return item * 10

    seen = []
    for result in map_ahead(work, [0, 1, 2, 3]):
        seen.append(result)
        if len(seen) < 4:  # while the caller holds result i, read i + 1 runs on the thread
            assert started[len(seen)].wait(5)
    assert seen == [0, 10, 20, 30]
    assert list(map_ahead(work, [])) == []


def test_an_error_comes_with_its_item_and_later_items_still_read():
    def work(item: int) -> int:
        if item == 1:
            raise ValueError("bad item")
        return item

    with ThreadPoolExecutor(max_workers=1) as pool:
        reads = ReadAhead(pool, [0, 1, 2], work)
        assert reads.next() == 0
        with pytest.raises(ValueError, match="bad item"):
            reads.next()
        assert reads.next() == 2


def test_ahead_keeps_that_many_reads_in_flight():
    gate = threading.Event()

    def work(item: int) -> int:
        gate.wait(5)
        return item

    with ThreadPoolExecutor(max_workers=1) as pool:
        reads = ReadAhead(pool, list(range(6)), work)
        reads.ahead = 3
        reads.top_up()
        assert reads.submitted == 3 and len(reads.pending) == 3
        gate.set()
        assert [reads.next() for _ in range(6)] == list(range(6))
        reads.cancel()
