"""
Prometheus metrics of the server: ``GET /metrics`` in the text exposition format.

Per chat request: its outcome, its tokens, the time to the first token (from arrival, queue
included, which is what a caller waits), the time per output token after it, the wait in
the queue and the engine's own phases; and the queue's depth, read at scrape time. The
registry is the server's own, so only these (and the process's CPU and memory) are exposed.
"""

import prometheus_client
from prometheus_client import (CollectorRegistry, CONTENT_TYPE_LATEST, Counter, Gauge,
                               generate_latest, Histogram, ProcessCollector)

from vlm_ros.engine.datatypes import FINISH_LENGTH, FINISH_STOP, Result

OUTCOMES = ('success', 'cancelled', 'busy', 'bad_request', 'unauthorized', 'not_found',
            'too_large', 'error')
"""Values of the ``outcome`` label of ``vlm_serve_requests_total``."""
_STATUS_OUTCOMES = {400: 'bad_request', 401: 'unauthorized', 404: 'not_found',
                    413: 'too_large', 429: 'busy'}
PHASES = ('preprocess', 'vision', 'prefill', 'decode')
_TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
_LONG_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def outcome_of_status(status: int) -> str:
    """Return the outcome label of a request that ended with HTTP ``status``."""
    if status < 400:
        return 'success'
    return _STATUS_OUTCOMES.get(status, 'bad_request' if status < 500 else 'error')


class Metrics:
    """The server's metrics, in a registry of their own."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, queue_depth, queue_capacity: int):
        # The *_created series (a timestamp per counter and histogram) only add noise to a
        # scrape; prometheus_client >= 0.17 can leave them out.
        getattr(prometheus_client, 'disable_created_metrics', lambda: None)()
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        self.requests = Counter('vlm_serve_requests', 'Chat completion requests by outcome.',
                                ['outcome'], registry=r)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)  # present at 0 from the start
        self.finish = Counter('vlm_serve_finish_reason',
                              'Answers by finish reason (stop, length).', ['reason'],
                              registry=r)
        self.prompt_tokens = Counter('vlm_serve_prompt_tokens',
                                     'Prompt tokens processed, image tokens included.',
                                     registry=r)
        self.completion_tokens = Counter('vlm_serve_completion_tokens',
                                         'Tokens generated.', registry=r)
        self.ttft = Histogram('vlm_serve_time_to_first_token_seconds',
                              'From the request arriving to its first text, queue included.',
                              buckets=_TTFT_BUCKETS, registry=r)
        self.tpot = Histogram('vlm_serve_time_per_output_token_seconds',
                              'Decode time per generated token after the first.',
                              buckets=_TPOT_BUCKETS, registry=r)
        self.duration = Histogram('vlm_serve_request_duration_seconds',
                                  'From the request arriving to its answer being complete.',
                                  buckets=_LONG_BUCKETS, registry=r)
        self.queue_wait = Histogram('vlm_serve_queue_wait_seconds',
                                    'Time a request waited for the model.',
                                    buckets=_LONG_BUCKETS, registry=r)
        self.phase = Histogram('vlm_serve_engine_phase_seconds',
                               "The engine's own time per phase of a request.", ['phase'],
                               buckets=_LONG_BUCKETS, registry=r)
        depth = Gauge('vlm_serve_queue_depth', 'Requests running or waiting for the model.',
                      registry=r)
        depth.set_function(queue_depth)
        Gauge('vlm_serve_queue_capacity', 'Most requests held at once (--queue-size).',
              registry=r).set(queue_capacity)

    def count(self, outcome: str):
        """Count one finished request."""
        self.requests.labels(outcome).inc()

    def observe(self, job, result: Result, arrived_at: float):
        """Record a finished answer: tokens, latencies and the engine's phases."""
        reason = FINISH_LENGTH if result.finish_reason == FINISH_LENGTH else FINISH_STOP
        self.finish.labels(reason).inc()
        self.prompt_tokens.inc(result.prompt_tokens)
        self.completion_tokens.inc(result.completion_tokens)
        if job.first_text_at is not None:
            self.ttft.observe(job.first_text_at - arrived_at)
        if job.started_at is not None:
            self.queue_wait.observe(job.started_at - arrived_at)
        if job.finished_at is not None:
            self.duration.observe(job.finished_at - arrived_at)
        t = result.timings
        steps = result.completion_tokens - 1
        if steps > 0 and t.decode_ms > 0:
            self.tpot.observe(t.decode_ms / 1000.0 / steps)
        for phase in PHASES:
            self.phase.labels(phase).observe(getattr(t, f'{phase}_ms') / 1000.0)

    def exposition(self) -> bytes:
        """Return the metrics in the Prometheus text format."""
        return generate_latest(self.registry)
