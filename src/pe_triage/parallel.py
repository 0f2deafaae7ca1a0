"""Worker processes for the data steps: one pool per run, started before planning."""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def worker_count(configured: int) -> int:
    """0 means one worker per core."""
    return configured or os.cpu_count() or 1


def available_cpus(cgroup: str = "/sys/fs/cgroup") -> int:
    """The CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota (``cpu.max``,
    what a Kubernetes CPU limit becomes). ``os.cpu_count`` counts the node's cores: a pod limited to
    2 CPUs of 64 would start 64 threads, which the quota then stalls for most of every period."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        with open(os.path.join(cgroup, "cpu.max")) as f:
            quota, period = f.read().split()[:2]
        limit = cpus if quota == "max" else int(quota) // int(period)
    except (OSError, ValueError):  # no cgroup v2 file here, or one this code does not understand
        return cpus
    return max(1, min(cpus, limit))


def cpu_share(parts: int = 1, cpus: int | None = None) -> int:
    """One of ``parts`` equal shares (at least 1) of ``cpus`` (default :func:`available_cpus`), at most
    ``OMP_NUM_THREADS`` when the environment sets it: an operator's explicit cap."""
    share = max(1, (cpus or available_cpus()) // parts)
    cap = os.environ.get("OMP_NUM_THREADS", "")
    return min(share, int(cap)) if cap.isdigit() and int(cap) > 0 else share


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


def stream(pool: Executor | None, fn: Callable[[T], R], items: Iterable[T], ahead: int) -> Iterator[R]:
    """:func:`run` with at most ``ahead`` tasks submitted but not yet consumed: results that wait
    for a slower consumer hold memory (a chunk of window stacks is megabytes), so the pool may only
    run that far ahead of it."""
    if pool is None:
        yield from map(fn, items)
        return
    pending: deque[Future[R]] = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()
