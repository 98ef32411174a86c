"""
The node's request line: jobs with a deadline that report their end to ROS callers.

The line and its workers are ``engine.work_line``'s (bounded, cooperative cancellation,
``set_concurrency`` for a batching decoder). A job here has a deadline
(``request_timeout_s``) and reports its end through ``on_done`` (topics, action) or
``wait`` (a blocking caller).
"""

import logging
import threading
import time
from typing import Any, Callable, Optional

from vlm_ros.engine.work_line import Busy, Closed, WorkLine

__all__ = ['Busy', 'Cancelled', 'Closed', 'Job', 'RequestQueue']
_LOG = logging.getLogger('vlm_ros.request_queue')


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


class RequestQueue(WorkLine):
    """The node's line: at most ``capacity`` jobs, the running ones included; shut at first."""

    def start(self):
        """Start taking work (on activate)."""
        self.open_line()

    def cancel(self, job: Job):
        """Cancel ``job``: a waiting job ends at once without running, a running one is told."""
        if self.withdraw(job):
            job.finish(error=Cancelled())

    def depth(self) -> int:
        """Jobs running, waiting or with a place held (the diagnostics' queue depth)."""
        with self._cond:
            return self._depth_locked()

    def close(self, grace_s: float = 5.0):
        """
        Stop taking work and cancel what is queued or running.

        Queued jobs end at once with ``Closed``; waits up to ``grace_s`` for the running jobs
        to notice their cancellation; returns True if they ended.
        """
        dropped, running = self.close_line()
        for job in dropped:
            job.finish(error=Closed())
        deadline = time.monotonic() + grace_s
        return all(job.wait(max(0.0, deadline - time.monotonic())) for job in running)

    def shutdown(self, grace_s: float = 5.0):
        """Cancel everything and end the worker threads (node shutdown)."""
        self.close(grace_s)
        self.close_line(stop_workers=True)
        self.join(grace_s)

    def worker_busy(self) -> bool:
        """Whether a worker is inside a job."""
        with self._cond:
            return bool(self._running)

    def _finish(self, job, result, error):
        job.finish(result, error)
