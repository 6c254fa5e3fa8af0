"""Background loading that keeps the order: jobs are queued in order and their results are
handed back in that same order, however the worker threads finish."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Prefetcher(Generic[T]):
    """A FIFO of up to ``depth`` jobs running on ``num_workers`` threads. Each job carries a
    ``tag`` (the caller's bookkeeping, e.g. the sampler state after that batch)."""

    def __init__(self, num_workers: int, depth: int | None = None) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers = {num_workers}: a prefetcher needs at least 1 thread")
        self.depth = depth or 2 * num_workers
        self._pool = ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="modmoe-data")
        self._queue: deque[tuple[Any, Future[T]]] = deque()

    def __len__(self) -> int:
        return len(self._queue)

    def full(self) -> bool:
        return len(self._queue) >= self.depth

    def push(self, tag: Any, fn: Callable[..., T], *args: Any) -> None:
        self._queue.append((tag, self._pool.submit(fn, *args)))

    def pop(self) -> tuple[Any, T]:
        """The oldest job's tag and result (waits for it; re-raises its exception)."""
        tag, future = self._queue.popleft()
        return tag, future.result()

    def clear(self) -> None:
        """Drops queued jobs (after a state restore makes them stale)."""
        for _, future in self._queue:
            future.cancel()
        self._queue.clear()

    def close(self) -> None:
        self.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)
