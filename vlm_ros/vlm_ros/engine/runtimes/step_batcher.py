"""
Continuous batching: concurrent requests' decode steps run as one decoder call.

A decode step reads every weight once whatever the number of rows it carries, so on a
memory-bound CPU several answers stepping together cost little more than one. Each request
keeps its own generation loop in its own thread (its sampling settings, stop rules, streaming
and cancellation stay exactly those of a request alone); only the decoder call is shared.

Callers submit jobs and block until theirs is done; one runner thread runs them all. (Run
from whichever caller happened to be waiting, the steps went through llama.cpp's OpenMP
build from four threads, each with a team of worker threads that spin after a step: a 4-row
step took 129 ms on two cores, 65 ms from one runner thread.) A batch of steps runs once
every decoding session has submitted its step, or once the oldest step has waited
``max_wait_s`` (a session whose caller is slow delays the others by no more). Prefill chunks
of requests that are joining run one at a time between step batches, so a long prompt
delays running answers by one chunk at most.
"""

import threading
import time
from typing import Any, Callable, List, Optional
import weakref


class _Job:
    __slots__ = ('session', 'tokens', 'fn', 'submitted', 'done', 'result', 'error')

    def __init__(self, session=None, tokens=None, fn=None):
        self.session, self.tokens, self.fn = session, tokens, fn
        self.submitted = time.monotonic()
        # Each caller waits on its own event: with one shared condition, every submission
        # woke every waiting caller only for it to sleep again.
        self.done = threading.Event()
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

    ``run_steps(list of StepJob)``, a bound method of the decoder, performs one decoder call
    for all the jobs and sets each job's result (its logits) or error. It is held weakly: the
    runner thread must not keep a decoder nobody uses alive (its close stops the runner).
    """

    def __init__(self, run_steps: Callable[[List[StepJob]], None], max_wait_s: float = 0.05):
        self._run_steps = weakref.WeakMethod(run_steps)
        self._max_wait = max_wait_s
        self._cond = threading.Condition()
        self._queue: List[_Job] = []
        self._decoding = set()
        self._stopping = False
        self._runner: Optional[threading.Thread] = None

    def joined(self, session):
        """``session`` has its prompt prefilled: step batches now wait for its steps too."""
        with self._cond:
            self._decoding.add(session)

    def left(self, session):
        """``session`` ended: batches no longer wait for it."""
        with self._cond:
            self._decoding.discard(session)
            self._cond.notify()

    def step(self, session, tokens):
        """Run ``session``'s step in the next batch; return its result."""
        return self._submit(_Job(session=session, tokens=tokens))

    def chunk(self, fn: Callable[[], Any]):
        """Run ``fn`` (one prefill chunk) alone, between step batches; return its result."""
        return self._submit(_Job(fn=fn))

    def close(self):
        """Stop the runner thread (jobs still queued fail)."""
        with self._cond:
            self._stopping = True
            for job in self._queue:
                job.error = RuntimeError('the decoder was closed')
                job.done.set()
            self._queue.clear()
            self._cond.notify()
        if self._runner is not None and self._runner is not threading.current_thread():
            self._runner.join(5.0)

    def _submit(self, job: _Job):
        with self._cond:
            if self._stopping:
                raise RuntimeError('the decoder was closed')
            if self._runner is None:
                self._runner = threading.Thread(target=self._run, name='vlm_decode',
                                                daemon=True)
                self._runner.start()
            self._queue.append(job)
            if self._worth_waking(job):
                self._cond.notify()  # only the runner waits on the condition
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def _worth_waking(self, job):
        """Whether ``job`` may let the runner start something (else it would sleep again)."""
        if job.fn is not None:
            return True
        steps = [item.session for item in self._queue if item.fn is None]
        return len(steps) == 1 or set(steps) >= self._decoding

    def _run(self):
        while self._run_once():
            pass

    def _run_once(self):
        """
        Run the next work; return False once stopping.

        Its locals (jobs that reference the decoder) end with the call, so a waiting runner
        does not keep the decoder alive.
        """
        with self._cond:
            while True:
                if self._stopping:
                    return False
                work, wait = self._pick()
                if work is not None:
                    break
                self._cond.wait(wait)
            for item in work:
                self._queue.remove(item)
        try:
            self._execute(work)
        finally:
            for item in work:
                item.done.set()
        return True

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
            run_steps = self._run_steps()
            if run_steps is None:
                raise RuntimeError('the decoder was closed')
            run_steps([StepJob(job) for job in work])
        except BaseException as exc:  # noqa: B902 -- every caller of the batch hears of it
            for job in work:
                if job.error is None and job.result is None:
                    job.error = exc
