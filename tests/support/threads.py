"""Start work in several threads at the same instant (concurrency tests: replicas, pharmacists)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


def all_at_once(n: int, work: Callable[[int], T]) -> list[T]:
    """Run ``work(0..n-1)`` in n threads released together by a barrier; results in order."""
    barrier = threading.Barrier(n)

    def go(i: int) -> T:
        barrier.wait()
        return work(i)

    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(go, range(n)))
