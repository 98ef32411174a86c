"""The data that crosses stages: image options, prepared requests, settings and results."""

import dataclasses
from dataclasses import dataclass, field
import math
import numbers
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from vlm_ros.engine.errors import GenerationError

FINISH_STOP = 'stop'
FINISH_LENGTH = 'length'
FINISH_CANCELLED = 'cancelled'
FINISH_ERROR = 'error'


@dataclass
class ImageOptions:
    """Latency knobs for the image, applied on top of the model's own configuration."""

    do_image_splitting: Optional[bool] = None
    """None: the model's preprocessor config decides."""
    max_tiles: int = 0
    """Cap on tiles when splitting; 0: the model's own limit."""


@dataclass
class PreparedRequest:
    """
    Everything the runtimes need for one request, as a model family lays it out.

    ``input_ids`` may be empty when the vision stage lays the prompt out itself (libmtmd):
    it then reads ``prompt_text`` and ``images`` and returns a request with the ids filled in.
    """

    input_ids: np.ndarray
    """int64 [seq]: the full prompt, image placeholders (``image_token_id``) included."""
    vision_inputs: Dict[str, np.ndarray] = field(default_factory=dict)
    """Named inputs of the vision encoder (e.g. ``pixel_values``); empty without an image."""
    image_token_id: Optional[int] = None
    """Token id whose positions receive the image features, in order."""
    num_image_tokens: int = 0
    prompt_text: str = ''
    """The rendered prompt, image tokens expanded (or one placeholder per image for libmtmd)."""
    images: List[np.ndarray] = field(default_factory=list)
    """The RGB uint8 images of the request, in prompt order."""
    image_inputs: List[Dict[str, np.ndarray]] = field(default_factory=list)
    """Per image: its vision inputs, or {} when its features are already known."""
    image_token_counts: List[int] = field(default_factory=list)
    """Per image: how many image positions (features) it fills."""
    image_features: List[Optional[np.ndarray]] = field(default_factory=list)
    """Per image: its features [tokens, hidden] when known (a cache), else None; the vision
    stage fills the gaps."""
    positions: Optional[np.ndarray] = None
    """int64 [3, seq]: multi-axis rotary positions (temporal, height, width) of each prompt
    token, for language models with M-RoPE (Qwen2-VL); None: consecutive positions."""
    seen_sizes: List[Tuple[int, int]] = field(default_factory=list)
    """Per image: (width, height) of the image the model saw after its own resize, for
    families whose boxes are in those pixels (``absolute``); empty: the original sizes."""


@dataclass(frozen=True)
class Limit:
    """The accepted range of one generation setting (a node parameter uses the same)."""

    low: float
    high: float
    low_open: bool = False
    """True: ``low`` itself is not accepted."""

    def text(self) -> str:
        """Write the range as an interval, e.g. ``(0, 1]``."""
        return f'{"(" if self.low_open else "["}{self.low:g}, {self.high:g}]'

    def check(self, name, value) -> Optional[str]:
        """Return why ``value`` is not acceptable for ``name``, or None."""
        if not math.isfinite(value):
            return f'{name} must be a finite number in {self.text()}, got {value!r}'
        if value < self.low or value > self.high or (self.low_open and value == self.low):
            return f'{name} must be in {self.text()}, got {value!r}'
        return None


GENERATION_LIMITS: Dict[str, Limit] = {
    'max_new_tokens': Limit(1, 32768),
    'min_new_tokens': Limit(0, 32768),
    'temperature': Limit(0.0, 100.0),
    'top_k': Limit(0, 100000),
    'top_p': Limit(0.0, 1.0, low_open=True),
    'repetition_penalty': Limit(0.01, 100.0),
    'seed': Limit(0, 2**31 - 1),
    'num_beams': Limit(1, 16),
    'length_penalty': Limit(-100.0, 100.0),
}
"""Ranges of the numeric generation settings, shared by the library, the node's parameters
and the per-request overrides of the ROS interfaces."""


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
        for name, limit in GENERATION_LIMITS.items():
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise GenerationError(f'{name} must be a number, got {value!r}')
            reason = limit.check(name, value)
            if reason:
                raise GenerationError(reason)
        checks = (
            (self.min_new_tokens <= self.max_new_tokens,
             f'min_new_tokens ({self.min_new_tokens}) must not exceed max_new_tokens '
             f'({self.max_new_tokens})'),
            (not (self.num_beams > 1 and self.do_sample),
             'beam search with sampling is not supported: set temperature 0 or num_beams 1'),
            (all(isinstance(s, str) and s for s in self.stop),
             f'stop strings must be non-empty strings, got {list(self.stop)!r}'),
        )
        for ok, message in checks:
            if not ok:
                raise GenerationError(message)
        return self


@dataclass(frozen=True)
class Box:
    """An axis-aligned box: corners (x1, y1) top left and (x2, y2) bottom right."""

    label: str
    x1: float
    y1: float
    x2: float
    y2: float
    score: float = 1.0
    """1.0 when the model gives none."""

    @property
    def center(self) -> Tuple[float, float]:
        """Return (x, y) of the box's centre."""
        return (self.x1 + self.x2) / 2.0, (self.y1 + self.y2) / 2.0

    @property
    def size(self) -> Tuple[float, float]:
        """Return (width, height)."""
        return self.x2 - self.x1, self.y2 - self.y1


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
    cached_tokens: int = 0
    """Prompt tokens not prefilled again: taken from a kept prefix (KV cache)."""
    backend: str = ''
    """What answered: ``local``, ``remote`` or ``local (fallback)``."""
    completion_token_count: Optional[int] = None
    """Generated tokens when the ids are unknown (a remote server reports only the count)."""
    detections: List[Box] = field(default_factory=list)
    """Boxes in the answer, in pixels of the request's first image (``engine.grounding``)."""
    dropped_boxes: int = 0
    """Boxes in the answer that could not be read or were empty after clipping."""

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
