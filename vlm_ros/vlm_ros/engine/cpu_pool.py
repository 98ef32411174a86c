"""
One thread pool for the engine's image work, sized to the cores this process may use.

Pillow's resampling and numpy's element-wise kernels release the GIL, so threads spread
preprocessing over every core. The pool is shared: vision and decoding run after
preprocessing, not beside it.
"""

import concurrent.futures
import os
import threading

_lock = threading.Lock()
_pool = None


def cores() -> int:
    """Return how many cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def pool() -> concurrent.futures.ThreadPoolExecutor:
    """Return the shared pool, created on first use."""
    global _pool
    with _lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(max(2, cores()), 'vlm_cpu')
        return _pool


def run_all(fn, items):
    """Call ``fn(item)`` for every item on the pool (inline when only one core); wait."""
    items = list(items)
    if cores() < 2 or len(items) < 2:
        for item in items:
            fn(item)
        return
    for future in [pool().submit(fn, item) for item in items]:
        future.result()
