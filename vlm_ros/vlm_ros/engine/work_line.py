"""
A bounded line of requests and the worker threads that run them on the model.

The model answers one request at a time with every core (or ``max_concurrent`` at once on a
batching llama.cpp decoder), so requests wait in line. The line holds at most ``capacity``
jobs, the running ones included, and refuses more at once instead of leaving callers waiting
for minutes. Cancellation is cooperative: the engine polls a job's ``should_stop`` between
tokens. The ROS node (``ros.request_queue``) and the server (``serve.scheduler``) add how a
job reports its end.

A job is any object with ``run(job)`` (called on a worker; its return value is the result)
and a ``cancelled`` ``threading.Event``.
"""

import collections
import threading
import time
from typing import Any, List, Optional, Tuple


class Busy(Exception):
    """The line is full."""


class Closed(Exception):
    """The line takes no more work (node not active, server shutting down)."""


class WorkLine:
    """At most ``capacity`` jobs, the running ones included, run by worker threads."""

    def __init__(self, capacity: int, concurrency: int = 1, open_now: bool = False,
                 thread_name: str = 'vlm_worker'):
        self.capacity = capacity
        self._waiting: collections.deque = collections.deque()
        self._running: set = set()
        self._reserved = 0
        self._cond = threading.Condition()
        self._open = open_now
        self._stopping = False
        self._concurrency = 0
        self._thread_name = thread_name
        self._threads: List[threading.Thread] = []
        self.set_concurrency(concurrency)

    # -- hooks for the adapters ----------------------------------------------------------

    def _full(self) -> Exception:
        """Return the exception that refuses a job when the line is full."""
        return Busy()

    def _started(self, job):
        """Call on the worker before ``job`` runs."""

    def _ended_locked(self, job):
        """Call on the worker, the line's lock held, once ``job`` has left the running set."""

    def _finish(self, job, result: Any, error: Optional[BaseException]):
        """Hand ``job``'s outcome to whoever waits for it (on the worker)."""
        raise NotImplementedError

    # -- the line ------------------------------------------------------------------------

    def set_concurrency(self, n: int):
        """Run up to ``n`` jobs at once (the decoder's ``max_concurrent``)."""
        with self._cond:
            self._concurrency = max(1, int(n))
            while len(self._threads) < self._concurrency:
                thread = threading.Thread(target=self._loop, daemon=True,
                                          name=f'{self._thread_name}_{len(self._threads)}')
                self._threads.append(thread)
                thread.start()
            self._cond.notify_all()

    def open_line(self):
        """Start taking work."""
        with self._cond:
            self._open = True

    def _depth_locked(self) -> int:
        return len(self._waiting) + len(self._running) + self._reserved

    def _check_room_locked(self):
        if not self._open:
            raise Closed()
        if self._depth_locked() >= self.capacity:
            raise self._full()

    def submit(self, job, reserved: bool = False):
        """
        Queue ``job``; raise the full-line exception (``Busy``) or ``Closed``.

        ``reserved``: the job takes the place a ``reserve`` call held for it.
        """
        with self._cond:
            if reserved:
                self._reserved -= 1
                if not self._open:
                    raise Closed()
            else:
                self._check_room_locked()
            self._waiting.append(job)
            self._cond.notify_all()
        return job

    def reserve(self):
        """
        Hold a place for a job that is not built yet (an action goal being accepted).

        Raises like ``submit``; ``submit(job, reserved=True)`` or ``release`` must follow.
        """
        with self._cond:
            self._check_room_locked()
            self._reserved += 1

    def release(self):
        """Give back a place ``reserve`` held."""
        with self._cond:
            self._reserved = max(0, self._reserved - 1)

    def withdraw(self, job) -> bool:
        """Cancel ``job``; True when it was waiting and has left the line (it never runs)."""
        job.cancelled.set()
        with self._cond:
            waiting = job in self._waiting
            if waiting:
                self._waiting.remove(job)
        return waiting

    def close_line(self, stop_workers: bool = False) -> Tuple[list, list]:
        """
        Stop taking work; cancel every job; return (the waiting ones, the running ones).

        The waiting jobs have left the line and never run; the running ones stop at their
        next poll. ``stop_workers``: the workers end too, each after its running job.
        """
        with self._cond:
            self._open = False
            self._stopping = self._stopping or stop_workers
            dropped = list(self._waiting)
            self._waiting.clear()
            running = list(self._running)
            self._cond.notify_all()
        for job in dropped + running:
            job.cancelled.set()
        return dropped, running

    def join(self, timeout: float):
        """Wait up to ``timeout`` seconds for the workers to end (after stopping them)."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _loop(self):
        while True:
            with self._cond:
                while not self._stopping and (
                        not self._waiting or len(self._running) >= self._concurrency):
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._waiting.popleft()
                self._running.add(job)
            self._started(job)
            result, error = None, None
            try:
                result = job.run(job)
            except BaseException as exc:  # reported to the caller, the worker goes on
                error = exc
            finally:
                with self._cond:
                    self._running.discard(job)
                    self._ended_locked(job)
                    self._cond.notify_all()
            self._finish(job, result, error)
