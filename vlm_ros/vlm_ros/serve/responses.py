"""
The engine's answers in the OpenAI shapes: a ``chat.completion``, or its stream of chunks.

Besides the standard fields, a completion and the last chunk carry ``vlm_ros``: the engine's
own timings per phase and the wait in the queue, so a client can see where the time went.
"""

import time
from typing import Any, Dict, Optional
import uuid

from vlm_ros.engine.datatypes import FINISH_LENGTH, FINISH_STOP, Result


def new_id() -> str:
    """Return a fresh completion id."""
    return 'chatcmpl-' + uuid.uuid4().hex


def finish_reason(result: Result) -> str:
    """Return the API's finish reason: ``length`` at the token limit, else ``stop``."""
    return FINISH_LENGTH if result.finish_reason == FINISH_LENGTH else FINISH_STOP


def usage(result: Result) -> Dict[str, int]:
    """Return the ``usage`` object (prompt tokens include the image tokens)."""
    return {'prompt_tokens': result.prompt_tokens,
            'completion_tokens': result.completion_tokens,
            'total_tokens': result.prompt_tokens + result.completion_tokens}


def extension(result: Result, job) -> Dict[str, Any]:
    """Return the ``vlm_ros`` object: image tokens and milliseconds per phase."""
    t = result.timings
    queue_ms = (job.started_at - job.submitted_at) * 1000.0 if job.started_at else 0.0
    return {'image_tokens': result.image_tokens,
            'timings_ms': {'queue': queue_ms, 'preprocess': t.preprocess_ms,
                           'vision': t.vision_ms, 'prefill': t.prefill_ms,
                           'decode': t.decode_ms, 'total': t.total_ms}}


def completion(model: str, result: Result, job) -> Dict[str, Any]:
    """Return the ``chat.completion`` object of an unstreamed answer."""
    return {
        'id': new_id(), 'object': 'chat.completion', 'created': int(time.time()),
        'model': model,
        'choices': [{'index': 0, 'message': {'role': 'assistant', 'content': result.text},
                     'logprobs': None, 'finish_reason': finish_reason(result)}],
        'usage': usage(result),
        'vlm_ros': extension(result, job),
    }


class Chunks:
    """Builds the ``chat.completion.chunk`` objects of one streamed answer."""

    def __init__(self, model: str, include_usage: bool):
        self.id = new_id()
        self.created = int(time.time())
        self.model = model
        self.include_usage = include_usage
        self.started = False
        """Whether a chunk with the assistant role went out."""

    def _chunk(self, delta, finish: Optional[str], **extra) -> Dict[str, Any]:
        chunk = {'id': self.id, 'object': 'chat.completion.chunk', 'created': self.created,
                 'model': self.model,
                 'choices': [{'index': 0, 'delta': delta, 'logprobs': None,
                              'finish_reason': finish}]}
        if self.include_usage:
            chunk['usage'] = None  # as OpenAI does: only the last chunk carries usage
        chunk.update(extra)
        return chunk

    def _delta(self, text):
        delta = {'content': text}
        if not self.started:
            # The role travels with the first text, not ahead of it: a chunk leaves only
            # once there is text to send.
            delta = {'role': 'assistant', 'content': text}
            self.started = True
        return delta

    def text(self, text: str) -> Dict[str, Any]:
        """Return the chunk of one text delta."""
        return self._chunk(self._delta(text), None)

    def finish(self, result: Result, job) -> Dict[str, Any]:
        """Return the chunk that ends the answer (empty delta unless nothing was sent)."""
        delta = {} if self.started else self._delta('')
        return self._chunk(delta, finish_reason(result), vlm_ros=extension(result, job))

    def usage(self, result: Result) -> Dict[str, Any]:
        """Return the usage chunk: no choices, the token counts."""
        return {'id': self.id, 'object': 'chat.completion.chunk', 'created': self.created,
                'model': self.model, 'choices': [], 'usage': usage(result)}
