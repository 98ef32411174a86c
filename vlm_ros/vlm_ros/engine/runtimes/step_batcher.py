"""
Continuous batching: concurrent requests' decode steps run as one decoder call.

A decode step reads every weight once whatever the number of rows it carries, so on a
memory-bound CPU several answers stepping together cost little more than one. Each request
keeps its own generation loop in its own thread (its sampling settings, stop rules, streaming
and cancellation stay exactly those of a request alone); only the decoder call is shared.

Callers submit jobs and block until theirs is done; whichever waiting caller finds work ready
runs it for everybody (no scheduler thread, so a lone request pays no hand-over). A batch of
steps runs once every decoding session has submitted its step, or once the oldest step has
waited ``max_wait_s`` (a session whose caller is slow delays the others by no more). Prefill
chunks of requests that are joining run one at a time between step batches, so a long prompt
delays running answers by one chunk at most.
"""

import threading
import time
from typing import Any, Callable, List, Optional


class _Job:
    __slots__ = ('session', 'tokens', 'fn', 'submitted', 'done', 'result', 'error')

    def __init__(self, session=None, tokens=None, fn=None):
        self.session, self.tokens, self.fn = session, tokens, fn
        self.submitted = time.monotonic()
        self.done = False
        self.result: Any = None
        self.error: Optional[BaseException] = None


class StepJob:
    """One session's step in a batch: ``tokens`` in; the runner sets ``result`` or ``error``."""

    def __init__(self, job: _Job):
        self._job = job

    @property
    def session(self):
        return self._job.session

    @property
    def tokens(self):
        return self._job.tokens

    def succeed(self, result):
        self._job.result = result

    def fail(self, error: BaseException):
        self._job.error = error


class StepBatcher:
    """
    Runs sessions' decode steps together and prefill chunks in between.

    ``run_steps(list of StepJob)`` performs one decoder call for all the jobs and sets each
    job's result (its logits) or error.
    """

    def __init__(self, run_steps: Callable[[List[StepJob]], None], max_wait_s: float = 0.005):
        self._run_steps = run_steps
        self._max_wait = max_wait_s
        self._cond = threading.Condition()
        self._queue: List[_Job] = []
        self._decoding = set()
        self._running = False

    def joined(self, session):
        """``session`` has its prompt prefilled: step batches now wait for its steps too."""
        with self._cond:
            self._decoding.add(session)

    def left(self, session):
        """``session`` ended: batches no longer wait for it."""
        with self._cond:
            self._decoding.discard(session)
            self._cond.notify_all()

    def step(self, session, tokens):
        """Run ``session``'s step in the next batch; return its result."""
        return self._submit(_Job(session=session, tokens=tokens))

    def chunk(self, fn: Callable[[], Any]):
        """Run ``fn`` (one prefill chunk) alone, between step batches; return its result."""
        return self._submit(_Job(fn=fn))

    def _submit(self, job: _Job):
        with self._cond:
            self._queue.append(job)
            self._cond.notify_all()
            while not job.done:
                work, wait = (None, None) if self._running else self._pick()
                if work is None:
                    self._cond.wait(wait)
                    continue
                self._running = True
                for item in work:
                    self._queue.remove(item)
                self._cond.release()
                try:
                    self._execute(work)
                finally:
                    self._cond.acquire()
                    self._running = False
                    for item in work:
                        item.done = True
                    self._cond.notify_all()
        if job.error is not None:
            raise job.error
        return job.result

    def _pick(self):
        """Return (jobs to run now, None) or (None, seconds to wait at most)."""
        steps = [job for job in self._queue if job.fn is None]
        if steps:
            waited = time.monotonic() - min(job.submitted for job in steps)
            if {job.session for job in steps} >= self._decoding or waited >= self._max_wait:
                return steps, None
        chunks = [job for job in self._queue if job.fn is not None]
        if chunks:
            return chunks[:1], None
        if steps:
            return None, max(0.0, self._max_wait - waited)
        return None, None

    def _execute(self, work: List[_Job]):
        if work[0].fn is not None:
            job = work[0]
            try:
                job.result = job.fn()
            except BaseException as exc:  # noqa: B902 -- raised again in its own caller
                job.error = exc
            return
        try:
            self._run_steps([StepJob(job) for job in work])
        except BaseException as exc:  # noqa: B902 -- every caller of the batch hears of it
            for job in work:
                if job.error is None and job.result is None:
                    job.error = exc
