"""Reading ahead: the next images decode on a thread while the current ones are worked on.

:class:`ReadAhead` runs ``work(item)`` for items in order on a thread pool, up to ``ahead``
of them in flight beyond the one asked for; :func:`map_ahead` is the plain loop over it (one
ahead). Used wherever images are read one after another for a backbone or a network: the
feature cache (:func:`mitoscope.cache.extract_dataset`), the fine-tuning image store and the
fine-tuned model's predictions.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Generic, Iterator, Sequence, TypeVar

__all__ = ["ReadAhead", "map_ahead"]

Item = TypeVar("Item")
Result = TypeVar("Result")


class ReadAhead(Generic[Item, Result]):
    """``work(item)`` for ``items`` in order on ``pool``'s thread, keeping up to ``ahead`` in
    flight beyond the one asked for, so that reading overlaps the caller's work.

    :meth:`next` gives the next result (raising what its ``work`` raised; the following item
    starts when the next result is asked for, or at :meth:`top_up`); :meth:`cancel` drops the
    reads not started.
    """

    def __init__(self, pool: ThreadPoolExecutor, items: Sequence[Item], work: Callable[[Item], Result]) -> None:
        self.pool, self.items, self.work = pool, list(items), work
        self.pending: deque[Future[Result]] = deque()
        self.submitted = 0
        self.ahead = 1

    def top_up(self) -> None:
        """Start reads until ``ahead`` are in flight (or every item is started)."""
        while self.submitted < len(self.items) and len(self.pending) < max(1, self.ahead):
            self.pending.append(self.pool.submit(self.work, self.items[self.submitted]))
            self.submitted += 1

    def next(self) -> Result:
        """The next result in order (raises what its ``work`` raised)."""
        self.top_up()
        result = self.pending.popleft().result()
        self.top_up()
        return result

    def cancel(self) -> None:
        for future in self.pending:
            future.cancel()


def map_ahead(work: Callable[[Item], Result], items: Sequence[Item]) -> Iterator[Result]:
    """``work(item)`` for every item, in order, the next one running on a thread meanwhile."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        reads = ReadAhead(pool, items, work)
        try:
            for _ in range(len(reads.items)):
                yield reads.next()
        finally:
            reads.cancel()
