"""The node's request queue, in-process: capacity, order, cancellation, completion callbacks."""

import threading
import time

import pytest
from vlm_ros.ros.request_queue import Busy, Closed, Job, RequestQueue


def _blocking_job(gate, log, name, **kwargs):
    def run(job):
        log.append(f'start {name}')
        while not gate.wait(0.01):
            if job.should_stop():
                log.append(f'stopped {name}')
                return 'stopped'
        log.append(f'end {name}')
        return name
    return Job(run, **kwargs)


@pytest.fixture
def queue():
    q = RequestQueue(2)
    q.start()
    yield q
    q.shutdown(grace_s=1.0)


def test_capacity_counts_the_running_job(queue):
    gate, log = threading.Event(), []
    first = queue.submit(_blocking_job(gate, log, 'a'))
    second = queue.submit(_blocking_job(gate, log, 'b'))
    with pytest.raises(Busy):
        queue.submit(_blocking_job(gate, log, 'c'))
    gate.set()
    assert first.wait(5) and second.wait(5)
    assert (first.result, second.result) == ('a', 'b')
    assert log == ['start a', 'end a', 'start b', 'end b']
    assert queue.submit(Job(lambda job: 'c')).wait(5)  # room again


def test_on_done_is_called_once_from_the_worker(queue):
    done = []
    event = threading.Event()

    def on_done(job):
        done.append((job.result, threading.current_thread().name))
        event.set()

    queue.submit(Job(lambda job: 42, on_done=on_done))
    assert event.wait(5)
    time.sleep(0.05)
    assert done == [(42, 'vlm_worker_0')]


def test_errors_reach_the_caller_and_the_worker_goes_on(queue):
    def fail(job):
        raise RuntimeError('boom')
    failed = queue.submit(Job(fail))
    assert failed.wait(5) and isinstance(failed.error, RuntimeError)
    assert queue.submit(Job(lambda job: 'ok')).wait(5)


def test_close_cancels_running_and_finishes_queued_at_once(queue):
    gate, log = threading.Event(), []
    dropped = []
    running = queue.submit(_blocking_job(gate, log, 'a'))
    while not log:
        time.sleep(0.01)
    waiting = queue.submit(_blocking_job(gate, log, 'b', on_done=dropped.append))
    assert queue.close(grace_s=5.0)
    assert running.result == 'stopped'
    assert isinstance(waiting.error, Closed) and waiting.cancelled.is_set()
    assert dropped == [waiting]
    assert 'start b' not in log
    with pytest.raises(Closed):
        queue.submit(Job(lambda job: None))


def test_deadline_and_should_stop():
    job = Job(lambda job: None, timeout_s=0.05)
    assert not job.should_stop()
    time.sleep(0.06)
    assert job.timed_out() and job.should_stop()
    assert not Job(lambda job: None).timed_out()


def test_worker_busy_and_shutdown():
    q = RequestQueue(1)
    q.start()
    gate, log = threading.Event(), []
    job = q.submit(_blocking_job(gate, log, 'a'))
    while not log:
        time.sleep(0.01)
    assert q.worker_busy()
    gate.set()
    assert job.wait(5)
    time.sleep(0.05)
    assert not q.worker_busy()
    q.shutdown(grace_s=1.0)
    assert not any(thread.is_alive() for thread in q._threads)


def test_concurrency_runs_that_many_jobs_at_once_within_the_capacity():
    q = RequestQueue(3)
    q.set_concurrency(2)
    q.start()
    gate, log = threading.Event(), []
    jobs = [q.submit(_blocking_job(gate, log, name)) for name in 'abc']
    deadline = time.monotonic() + 5
    while len(log) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    assert sorted(log) == ['start a', 'start b']  # the third waits for a worker
    with pytest.raises(Busy):
        q.submit(Job(lambda job: None))  # two running + one waiting = capacity
    gate.set()
    assert all(job.wait(5) for job in jobs) and [job.result for job in jobs] == list('abc')
    q.shutdown(grace_s=1.0)
