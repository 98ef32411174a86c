"""Generation settings and results shared by every family and runtime."""

import dataclasses
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from vlm_ros.engine.errors import GenerationError

FINISH_STOP = 'stop'
FINISH_LENGTH = 'length'
FINISH_CANCELLED = 'cancelled'
FINISH_ERROR = 'error'


@dataclass(frozen=True)
class GenerationConfig:
    """How to pick tokens; the defaults are greedy decoding."""

    max_new_tokens: int = 256
    min_new_tokens: int = 0
    """End-of-sequence tokens are suppressed until this many tokens exist."""
    temperature: float = 0.0
    """0: greedy (argmax); > 0: sample."""
    top_k: int = 0
    """0: off."""
    top_p: float = 1.0
    """1: off."""
    repetition_penalty: float = 1.0
    """1: off. Penalises every token already in the sequence, prompt included."""
    seed: Optional[int] = None
    """None: a fresh seed per request."""
    num_beams: int = 1
    length_penalty: float = 1.0
    """Beam search: finished beams score log-prob / generated_length ** length_penalty."""
    stop: Sequence[str] = ()
    """Strings that end the answer; the text is cut before them."""
    ignore_eos: bool = False
    """Keep generating past end-of-sequence tokens (benchmarks)."""

    @property
    def do_sample(self):
        """Whether tokens are sampled rather than chosen by argmax."""
        return self.temperature > 0.0

    def replace(self, **changes):
        """Return a copy with ``changes`` applied (None values are ignored)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        return dataclasses.replace(self, **changes)

    def validate(self):
        """Raise GenerationError naming the first setting out of range."""
        checks = (
            (self.max_new_tokens >= 1, 'max_new_tokens must be >= 1'),
            (0 <= self.min_new_tokens <= self.max_new_tokens,
             'min_new_tokens must be in [0, max_new_tokens]'),
            (self.temperature >= 0.0, 'temperature must be >= 0 (0 = greedy)'),
            (self.top_k >= 0, 'top_k must be >= 0 (0 = off)'),
            (0.0 < self.top_p <= 1.0, 'top_p must be in (0, 1]'),
            (self.repetition_penalty > 0.0, 'repetition_penalty must be > 0 (1 = off)'),
            (self.num_beams >= 1, 'num_beams must be >= 1'),
            (not (self.num_beams > 1 and self.do_sample),
             'beam search with sampling is not supported: set temperature 0 or num_beams 1'),
            (self.seed is None or self.seed >= 0, 'seed must be >= 0'),
            (all(isinstance(s, str) and s for s in self.stop),
             'stop strings must be non-empty strings'),
        )
        for ok, message in checks:
            if not ok:
                raise GenerationError(f'{message} (got {self})')
        return self


@dataclass
class Timings:
    """Milliseconds spent per phase of one request."""

    preprocess_ms: float = 0.0
    vision_ms: float = 0.0
    prefill_ms: float = 0.0
    """Prompt decode up to and including the first new token's logits."""
    decode_ms: float = 0.0
    """Every decoder step after the first token."""
    total_ms: float = 0.0


@dataclass
class Result:
    """One answer: text, why it ended, token counts and timings."""

    text: str
    finish_reason: str
    token_ids: List[int] = field(default_factory=list)
    prompt_tokens: int = 0
    """Prompt length in tokens, image tokens included."""
    image_tokens: int = 0
    timings: Timings = field(default_factory=Timings)
    completion_token_count: Optional[int] = None
    """Generated tokens when the ids are unknown (a remote server reports only the count)."""

    @property
    def completion_tokens(self):
        """Count generated tokens (end-of-sequence included when one ended the answer)."""
        if self.completion_token_count is not None:
            return self.completion_token_count
        return len(self.token_ids)

    @property
    def decode_tokens_per_s(self):
        """Tokens per second after the first one (0 when there was only one)."""
        steps = self.completion_tokens - 1
        return steps / (self.timings.decode_ms / 1000.0) if steps > 0 and \
            self.timings.decode_ms > 0 else 0.0
