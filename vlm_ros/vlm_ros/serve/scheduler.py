"""
The server's bounded queue: worker threads run the model, one request each.

An answerer serves one request at a time (or ``max_concurrent`` on a batching llama.cpp
decoder) and uses every core for it, so requests wait in line; the line holds at most
``capacity`` requests, the running ones included, and a request beyond that is refused at
once (HTTP 429) rather than left waiting for minutes. A request whose client went away leaves
the line at once, or, while running, stops at the engine's next ``should_stop`` poll (between
tokens).

A worker thread hands text and the outcome to the request's asyncio task through
``loop.call_soon_threadsafe``: the event loop never blocks on the model.
"""

import asyncio
import collections
import logging
import math
import threading
import time
from typing import Any, Callable, Optional, Tuple

_LOG = logging.getLogger('vlm_ros.serve')

FIRST_CHUNK_WAIT_S = 0.02
"""How long the worker holds the next decode step while a stream's first chunk goes out."""

TEXT = 'text'
DONE = 'done'
ERROR = 'error'
CLOSED = 'closed'
"""Event kinds a job delivers: text deltas, then the Result, an exception or a shutdown."""


class QueueFull(Exception):
    """The line is full; ``retry_after_s`` estimates when a place frees up."""

    def __init__(self, capacity: int, retry_after_s: int):
        super().__init__(f'the server is busy: {capacity} requests are already running or '
                         'waiting (--queue-size); retry later')
        self.capacity = capacity
        self.retry_after_s = retry_after_s


class Closed(Exception):
    """The server is shutting down and takes no more work."""


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


class Scheduler:
    """A line of at most ``capacity`` jobs, the running ones included, and its workers."""

    def __init__(self, capacity: int, workers: int = 1):
        if capacity < 1:
            raise ValueError(f'queue size must be at least 1, got {capacity}')
        self.capacity = capacity
        self._waiting: collections.deque = collections.deque()
        self._running: set = set()
        self._cond = threading.Condition()
        self._closed = False
        self._mean_s = 0.0
        """Moving average of how long a job runs, for Retry-After."""
        self._threads = [threading.Thread(target=self._loop, name=f'vlm_serve_worker_{i}',
                                          daemon=True) for i in range(max(1, workers))]
        for thread in self._threads:
            thread.start()

    @property
    def depth(self) -> int:
        """Jobs running or waiting."""
        with self._cond:
            return len(self._waiting) + len(self._running)

    @property
    def waiting(self) -> int:
        """Jobs waiting for the worker."""
        with self._cond:
            return len(self._waiting)

    def check_room(self):
        """Raise QueueFull when a new job would be refused now (nothing is reserved)."""
        with self._cond:
            if len(self._waiting) + len(self._running) >= self.capacity:
                raise QueueFull(self.capacity, self._retry_after())

    def submit(self, job: Job):
        """Queue ``job``; raise QueueFull when the line is full, Closed when shutting down."""
        with self._cond:
            if self._closed:
                raise Closed()
            depth = len(self._waiting) + len(self._running)
            if depth >= self.capacity:
                raise QueueFull(self.capacity, self._retry_after())
            self._waiting.append(job)
            self._cond.notify_all()

    def cancel(self, job: Job):
        """Withdraw a waiting job at once, or ask a running one to stop (client gone)."""
        job.cancelled.set()
        with self._cond:
            try:
                self._waiting.remove(job)
            except ValueError:
                pass  # running (it stops at the next poll) or already finished

    def close(self):
        """Stop taking work; end waiting jobs with CLOSED and ask the running one to stop."""
        with self._cond:
            self._closed = True
            dropped = list(self._waiting)
            self._waiting.clear()
            running = list(self._running)
            self._cond.notify_all()
        for job in dropped:
            job.cancelled.set()
            job.deliver(CLOSED, None)
        for job in running:
            job.cancelled.set()

    def join(self, timeout: float):
        """Wait up to ``timeout`` seconds for the workers to end (after ``close``)."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _retry_after(self):
        # A place frees up when a running job ends: about a mean job's time, at least 1 s
        # (Retry-After counts whole seconds) and at most a minute.
        return int(min(60, max(1, math.ceil(self._mean_s or 1.0))))

    def _loop(self):
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if not self._waiting:
                    return  # closed and drained
                job = self._waiting.popleft()
                self._running.add(job)
            job.started_at = time.perf_counter()
            kind, value = DONE, None
            try:
                value = job.run(job)
            except Exception as exc:  # noqa: B902 -- reported to the request, the worker goes on
                kind, value = ERROR, exc
            finally:
                job.finished_at = time.perf_counter()
                with self._cond:
                    self._running.discard(job)
                    elapsed = job.finished_at - job.started_at
                    self._mean_s = elapsed if not self._mean_s else \
                        0.8 * self._mean_s + 0.2 * elapsed
            job.deliver(kind, value)
