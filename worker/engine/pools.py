"""The process's thread pools (submit threads, poll threads), one of each per process, created on
first use: a batch pass borrows them instead of starting threads of its own."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

_lock = threading.Lock()
_pools: dict[str, ThreadPoolExecutor] = {}


def shared_pool(name: str, threads: int, initializer: Callable[[], None] | None = None) -> ThreadPoolExecutor:
    """The process's pool called `name` (its size is fixed by the first call)."""
    with _lock:
        pool = _pools.get(name)
        if pool is None:
            pool = _pools[name] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name, initializer=initializer)
        return pool


def reset_pools() -> None:
    """Forget the pools (after a fork: a child must not use its parent's threads)."""
    with _lock:
        _pools.clear()
