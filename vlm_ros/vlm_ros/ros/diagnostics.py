"""
What fleet tools read on ``/diagnostics``: one ``diagnostic_msgs/DiagnosticStatus`` per node.

Published at ``diagnostics_period_s`` in every lifecycle state: the state, backend and
model, queue depth, requests answered / failed / refused, the last time to first token and
time per token, which backend answered last, and the process's resident memory. The level
is ERROR after a failed activation, WARN when the remote server is unreachable (or the
local fallback answered) or ``diagnostics_failures_warn`` requests in a row failed, OK
otherwise.
"""

import os
import threading

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from vlm_ros.engine.fallback import FALLBACK

_PAGE = os.sysconf('SC_PAGE_SIZE') if hasattr(os, 'sysconf') else 4096


def rss_mb() -> float:
    """Return this process's resident memory in MiB (0 where /proc is missing)."""
    try:
        with open('/proc/self/statm', encoding='ascii') as f:
            return int(f.read().split()[1]) * _PAGE / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


class RequestStats:
    """Counts and last timings of the node's requests (thread-safe)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.answered = self.failed = self.refused = self.in_a_row_failed = 0
        self.last_ttft_ms = self.last_tpot_ms = None
        self.last_backend = ''
        self.last_error = ''
        self.unreachable = ''

    def record(self, answer, unreachable=''):
        """Count an answer (an ``messages.Answer``) that the model or server gave."""
        with self._lock:
            self.unreachable = unreachable
            if answer.success:
                self.answered += 1
                self.in_a_row_failed = 0
            else:
                self.failed += 1
                self.in_a_row_failed += 1
                self.last_error = answer.error
            r = answer.result
            if r is not None:
                t = r.timings
                if r.completion_tokens:
                    self.last_ttft_ms = t.preprocess_ms + t.vision_ms + t.prefill_ms
                if r.completion_tokens > 1:
                    self.last_tpot_ms = t.decode_ms / (r.completion_tokens - 1)
                self.last_backend = r.backend

    def refuse(self):
        """Count a request refused before it ran (busy, not active)."""
        with self._lock:
            self.refused += 1


def status(name, state, spec_text, queue_depth, stats: RequestStats, activation_error,
           failures_warn) -> DiagnosticStatus:
    """Build the node's DiagnosticStatus from what the node knows now."""
    with stats._lock:
        values = {
            'lifecycle_state': state, 'model': spec_text, 'queue_depth': queue_depth,
            'requests_answered': stats.answered, 'requests_failed': stats.failed,
            'requests_refused': stats.refused, 'failed_in_a_row': stats.in_a_row_failed,
            'last_ttft_ms': _fmt(stats.last_ttft_ms), 'last_tpot_ms': _fmt(stats.last_tpot_ms),
            'last_backend': stats.last_backend or '-', 'rss_mb': f'{rss_mb():.0f}',
        }
        if stats.last_error:
            values['last_error'] = stats.last_error[:300]
        level, message = DiagnosticStatus.OK, f'{state}'
        if activation_error:
            level, message = DiagnosticStatus.ERROR, f'activation failed: {activation_error}'
        elif stats.unreachable:
            level = DiagnosticStatus.WARN
            message = ('remote server unreachable'
                       + ('; the local model answers' if stats.last_backend == FALLBACK
                          else '') + f': {stats.unreachable}')
        elif stats.in_a_row_failed >= failures_warn:
            level = DiagnosticStatus.WARN
            message = f'{stats.in_a_row_failed} requests in a row failed: {stats.last_error}'
    return DiagnosticStatus(
        level=level, name=f'{name}: vision-language model', message=message[:500],
        hardware_id=spec_text, values=[KeyValue(key=k, value=str(v)) for k, v in values.items()])


def _fmt(value):
    return '-' if value is None else f'{value:.1f}'


def array(stamp, statuses) -> DiagnosticArray:
    """Wrap statuses into the message ``/diagnostics`` carries."""
    msg = DiagnosticArray(status=list(statuses))
    msg.header.stamp = stamp
    return msg
