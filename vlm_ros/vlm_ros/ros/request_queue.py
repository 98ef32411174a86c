"""
One worker thread answering requests in order, with a bounded waiting line.

The model runs one request at a time (it uses every core); callers beyond the line's
capacity are refused at once instead of piling up. Cancellation is cooperative: the engine
polls ``Job.should_stop`` between tokens.
"""

import collections
import threading
import time
from typing import Any, Callable, Optional


class Busy(Exception):
    """The waiting line is full."""


class Closed(Exception):
    """The queue no longer takes work (node not active)."""


class Job:
    """One request: what to run, its deadline, and its outcome."""

    def __init__(self, run: Callable[['Job'], Any], timeout_s: float = 0.0):
        self.run = run
        self.deadline = time.monotonic() + timeout_s if timeout_s > 0 else None
        self.cancelled = threading.Event()
        self.done = threading.Event()
        self.result: Any = None
        self.error: Optional[BaseException] = None
        self.started = False

    def timed_out(self):
        """Whether the job's deadline has passed."""
        return self.deadline is not None and time.monotonic() > self.deadline

    def should_stop(self):
        """Tell the engine, which polls between tokens, to stop."""
        return self.cancelled.is_set() or self.timed_out()

    def wait(self, timeout=None):
        """Block until the job finished; True if it did."""
        return self.done.wait(timeout)


class RequestQueue:
    """A single worker holding at most ``capacity`` jobs, the running one included."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._pending: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._open = False
        self._running: Optional[Job] = None
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name='vlm_worker', daemon=True)
        self._thread.start()

    def start(self):
        """Start taking work."""
        with self._cond:
            self._open = True

    def submit(self, job: Job) -> Job:
        """Queue ``job``; raises Busy when the line is full and Closed when not open."""
        with self._cond:
            if not self._open:
                raise Closed()
            if len(self._pending) + (self._running is not None) >= self.capacity:
                raise Busy()
            self._pending.append(job)
            self._cond.notify_all()
        return job

    def close(self, grace_s: float = 5.0):
        """
        Stop taking work and cancel what is queued or running.

        Waits up to ``grace_s`` for the running job to notice; returns True if it ended.
        """
        with self._cond:
            self._open = False
            dropped = list(self._pending)
            self._pending.clear()
            running = self._running
        for job in dropped:
            job.cancelled.set()
            job.error = Closed()
            job.done.set()
        if running is not None:
            running.cancelled.set()
            return running.wait(grace_s)
        return True

    def shutdown(self):
        """End the worker thread (node shutdown)."""
        self.close()
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(10)

    @property
    def busy(self):
        """Jobs running or waiting."""
        with self._cond:
            return len(self._pending) + (self._running is not None)

    def _loop(self):
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._pending.popleft()
                self._running = job
            try:
                job.started = True
                job.result = job.run(job)
            except BaseException as exc:  # reported to the caller, the worker goes on
                job.error = exc
            finally:
                with self._cond:
                    self._running = None
                job.done.set()
