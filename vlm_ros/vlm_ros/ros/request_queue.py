"""
Worker threads answering requests in order, with a bounded waiting line.

The model runs one request at a time (it uses every core), or as many as its decoder batches
(``set_concurrency``); callers beyond the line's capacity are refused at once instead of
piling up. Cancellation is cooperative: the engine polls ``Job.should_stop`` between tokens.
A job reports its end through ``on_done`` (topics, action) or ``wait`` (a blocking service
callback).
"""

import collections
import logging
import threading
import time
from typing import Any, Callable, Optional

_LOG = logging.getLogger('vlm_ros.request_queue')


class Busy(Exception):
    """The waiting line is full."""


class Closed(Exception):
    """The queue no longer takes work (node not active)."""


class Cancelled(Exception):
    """The job was cancelled while it waited: it never ran."""


class Job:
    """One request: what to run, its deadline, and its outcome."""

    def __init__(self, run: Callable[['Job'], Any], timeout_s: float = 0.0,
                 on_done: Optional[Callable[['Job'], None]] = None):
        self.run = run
        self.deadline = time.monotonic() + timeout_s if timeout_s > 0 else None
        self.cancelled = threading.Event()
        self.done = threading.Event()
        self.result: Any = None
        self.error: Optional[BaseException] = None
        self.on_done = on_done

    def timed_out(self):
        """Whether the job's deadline has passed."""
        return self.deadline is not None and time.monotonic() > self.deadline

    def should_stop(self):
        """Tell the engine, which polls between tokens, to stop."""
        return self.cancelled.is_set() or self.timed_out()

    def wait(self, timeout=None):
        """Block until the job finished; True if it did."""
        return self.done.wait(timeout)

    def finish(self, result=None, error: Optional[BaseException] = None):
        """Record the outcome, wake waiters and call ``on_done`` (once)."""
        if self.done.is_set():
            return
        self.result, self.error = result, error
        self.done.set()
        if self.on_done is not None:
            try:
                self.on_done(self)
            except Exception:  # noqa: B902 -- a reporting failure must not stop the worker
                _LOG.exception('a job completion callback failed')


class RequestQueue:
    """Workers holding at most ``capacity`` jobs, the running ones included."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._pending: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._open = False
        self._running: set = set()
        self._reserved = 0
        self._stopping = False
        self._concurrency = 0
        self._threads = []
        self.set_concurrency(1)

    def set_concurrency(self, n: int):
        """Run up to ``n`` jobs at once (the decoder's ``max_concurrent``)."""
        with self._cond:
            self._concurrency = max(1, int(n))
            while len(self._threads) < self._concurrency:
                thread = threading.Thread(target=self._loop, daemon=True,
                                          name=f'vlm_worker_{len(self._threads)}')
                self._threads.append(thread)
                thread.start()
            self._cond.notify_all()

    def start(self):
        """Start taking work."""
        with self._cond:
            self._open = True

    def _check_room(self):
        if not self._open:
            raise Closed()
        if len(self._pending) + len(self._running) + self._reserved >= self.capacity:
            raise Busy()

    def submit(self, job: Job, reserved: bool = False) -> Job:
        """
        Queue ``job``; raises Busy when the line is full and Closed when not open.

        ``reserved``: the job takes the place a ``reserve`` call held for it.
        """
        with self._cond:
            if reserved:
                self._reserved -= 1
                if not self._open:
                    raise Closed()
            else:
                self._check_room()
            self._pending.append(job)
            self._cond.notify_all()
        return job

    def reserve(self):
        """
        Hold a place for a job that is not built yet (an action goal being accepted).

        Raises Busy or Closed like ``submit``; ``submit(job, reserved=True)`` or ``release``
        must follow.
        """
        with self._cond:
            self._check_room()
            self._reserved += 1

    def release(self):
        """Give back a place ``reserve`` held."""
        with self._cond:
            self._reserved = max(0, self._reserved - 1)

    def cancel(self, job: Job):
        """Cancel ``job``: a waiting job ends at once without running, a running one is told."""
        job.cancelled.set()
        with self._cond:
            waiting = job in self._pending
            if waiting:
                self._pending.remove(job)
        if waiting:
            job.finish(error=Cancelled())

    def depth(self) -> int:
        """Jobs running, waiting or with a place held (the diagnostics' queue depth)."""
        with self._cond:
            return len(self._pending) + len(self._running) + self._reserved

    def close(self, grace_s: float = 5.0):
        """
        Stop taking work and cancel what is queued or running.

        Queued jobs end at once with ``Closed``; waits up to ``grace_s`` for the running jobs
        to notice their cancellation; returns True if they ended.
        """
        with self._cond:
            self._open = False
            dropped = list(self._pending)
            self._pending.clear()
            running = list(self._running)
        for job in dropped:
            job.cancelled.set()
            job.finish(error=Closed())
        for job in running:
            job.cancelled.set()
        deadline = time.monotonic() + grace_s
        return all(job.wait(max(0.0, deadline - time.monotonic())) for job in running)

    def shutdown(self, grace_s: float = 5.0):
        """Cancel everything and end the worker thread (node shutdown)."""
        self.close(grace_s)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        deadline = time.monotonic() + grace_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def worker_busy(self) -> bool:
        """Whether a worker is inside a job."""
        with self._cond:
            return bool(self._running)

    def _loop(self):
        while True:
            with self._cond:
                while not self._stopping and (
                        not self._pending or len(self._running) >= self._concurrency):
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._pending.popleft()
                self._running.add(job)
            result, error = None, None
            try:
                result = job.run(job)
            except BaseException as exc:  # reported to the caller, the worker goes on
                error = exc
            finally:
                with self._cond:
                    self._running.discard(job)
                    self._cond.notify_all()
            job.finish(result, error)
