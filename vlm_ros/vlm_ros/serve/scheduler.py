"""
The server's request line: jobs that hand their text and outcome to asyncio tasks.

The line and its workers are ``engine.work_line``'s: at most ``capacity`` requests, the
running ones included; one beyond that is refused at once (HTTP 429, with a Retry-After from
the mean time a request runs). A request whose client went away leaves the line at once, or,
while running, stops at the engine's next ``should_stop`` poll (between tokens).

A worker thread hands text and the outcome to the request's asyncio task through
``loop.call_soon_threadsafe``: the event loop never blocks on the model.
"""

import asyncio
import math
import threading
import time
from typing import Any, Callable, Optional, Tuple

from vlm_ros.engine.work_line import Busy, Closed, WorkLine

__all__ = ['CLOSED', 'Closed', 'DONE', 'ERROR', 'Job', 'QueueFull', 'Scheduler', 'TEXT']

FIRST_CHUNK_WAIT_S = 0.02
"""How long the worker holds the next decode step while a stream's first chunk goes out."""

TEXT = 'text'
DONE = 'done'
ERROR = 'error'
CLOSED = 'closed'
"""Event kinds a job delivers: text deltas, then the Result, an exception or a shutdown."""


class QueueFull(Busy):
    """The line is full; ``retry_after_s`` estimates when a place frees up."""

    def __init__(self, capacity: int, retry_after_s: int):
        super().__init__(f'the server is busy: {capacity} requests are already running or '
                         'waiting (--queue-size); retry later')
        self.capacity = capacity
        self.retry_after_s = retry_after_s


class Job:
    """
    One request: what to run on the worker, and its events for the request's task.

    ``run(job)`` is called on the worker thread and returns the engine's Result; it passes
    ``job.on_text`` and ``job.should_stop`` to the engine. With ``stream`` False text
    deltas are only timed, not delivered.
    """

    def __init__(self, run: Callable[['Job'], Any], loop: asyncio.AbstractEventLoop,
                 stream: bool = False):
        self.run = run
        self.stream = stream
        self.cancelled = threading.Event()
        self.submitted_at = time.perf_counter()
        self.started_at: Optional[float] = None
        self.first_text_at: Optional[float] = None
        self.finished_at: Optional[float] = None
        self.first_sent = threading.Event()
        self._loop = loop
        self._events: asyncio.Queue = asyncio.Queue()

    def should_stop(self) -> bool:
        """Tell the engine, which polls between tokens, to stop."""
        return self.cancelled.is_set()

    def on_text(self, text: str):
        """Take a text delta from the engine (worker thread)."""
        first = self.first_text_at is None
        if first:
            self.first_text_at = time.perf_counter()
        if self.stream:
            self.deliver(TEXT, text)
            if first:
                # The decode threads take every core: let the event loop (and a client on
                # this machine) send and read the first chunk before the next step starts,
                # so time to first token is the engine's, not a wait for a free core.
                self.first_sent.wait(FIRST_CHUNK_WAIT_S)

    async def next_event(self) -> Tuple[str, Any]:
        """Wait for the next (kind, value): TEXT deltas, then DONE, ERROR or CLOSED."""
        return await self._events.get()

    def deliver(self, kind, value):
        """Queue an event for the request's task (from any thread)."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, (kind, value))
        except RuntimeError:
            pass  # the event loop is gone (server stopped): nobody is waiting any more


class Scheduler(WorkLine):
    """The server's line: at most ``capacity`` jobs, the running ones included."""

    def __init__(self, capacity: int, workers: int = 1):
        if capacity < 1:
            raise ValueError(f'queue size must be at least 1, got {capacity}')
        self._mean_s = 0.0
        """Moving average of how long a job runs, for Retry-After."""
        super().__init__(capacity, workers, open_now=True, thread_name='vlm_serve_worker')

    @property
    def depth(self) -> int:
        """Jobs running or waiting."""
        with self._cond:
            return self._depth_locked()

    @property
    def waiting(self) -> int:
        """Jobs waiting for the worker."""
        with self._cond:
            return len(self._waiting)

    def check_room(self):
        """Raise QueueFull (or Closed) when a new job would be refused now."""
        with self._cond:
            self._check_room_locked()

    def cancel(self, job: Job):
        """Withdraw a waiting job at once, or ask a running one to stop (client gone)."""
        self.withdraw(job)

    def close(self):
        """Stop taking work; end waiting jobs with CLOSED and ask the running ones to stop."""
        dropped, _ = self.close_line(stop_workers=True)
        for job in dropped:
            job.deliver(CLOSED, None)

    def _full(self):
        # A place frees up when a running job ends: about a mean job's time, at least 1 s
        # (Retry-After counts whole seconds) and at most a minute.
        return QueueFull(self.capacity, int(min(60, max(1, math.ceil(self._mean_s or 1.0)))))

    def _started(self, job):
        job.started_at = time.perf_counter()

    def _ended_locked(self, job):
        job.finished_at = time.perf_counter()
        elapsed = job.finished_at - job.started_at
        self._mean_s = elapsed if not self._mean_s else 0.8 * self._mean_s + 0.2 * elapsed

    def _finish(self, job, result, error):
        if error is None:
            job.deliver(DONE, result)
        else:
            job.deliver(ERROR, error)
