"""Worker processes for the data steps: one pool per run, started before planning."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def worker_count(configured: int) -> int:
    """0 means one worker per core."""
    return configured or os.cpu_count() or 1


def _warm() -> None:
    """First task of each worker: the worker imports the step's modules while the parent plans."""


@contextmanager
def worker_pool(workers: int) -> Iterator[ProcessPoolExecutor | None]:
    """A pool of ``workers`` processes for the length of a block, or None for one worker (everything
    runs in-process: simpler to debug, no start-up cost). Leaving the block, by error too, cancels
    what has not started, so a failed step does not run on in the background."""
    if workers <= 1:
        yield None
        return
    # spawn, not fork: the parent may hold Arrow threads, which fork would copy half-alive
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        for _ in range(workers):
            pool.submit(_warm)
        yield pool
    finally:
        pool.shutdown(cancel_futures=True)


def run(pool: Executor | None, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
    """``map`` in the pool, or in this process without one; results in input order."""
    return map(fn, items) if pool is None else pool.map(fn, items)
