"""The small interface between a model family and the runtimes."""

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np


@dataclass
class PreparedRequest:
    """Everything a runtime needs for one request, produced by a model family."""

    input_ids: np.ndarray
    """int64 [seq]: the full prompt, image placeholders (``image_token_id``) included."""
    vision_inputs: Dict[str, np.ndarray] = field(default_factory=dict)
    """Named inputs of the vision encoder (e.g. ``pixel_values``); empty without an image."""
    image_token_id: Optional[int] = None
    """Token id whose positions receive the image features, in order."""
    num_image_tokens: int = 0
    prompt_text: str = ''
    """The rendered prompt, image tokens expanded: for logs and debugging."""


@dataclass
class ImageOptions:
    """Latency knobs for the image, applied on top of the model's own configuration."""

    do_image_splitting: Optional[bool] = None
    """None: the model's preprocessor config decides."""
    max_tiles: int = 0
    """Cap on tiles when splitting; 0: the model's own limit."""


class ModelFamily:
    """
    Preprocessing, prompt layout and special tokens of one model family.

    Subclasses read every constant from the model's own files in ``model_dir``.
    """

    name = ''
    eos_token_ids: List[int] = []
    context_length = 0
    text_hidden_size = 0

    def prepare(self, image, prompt, system_prompt='', image_options=None) -> PreparedRequest:
        """Build the request for an RGB uint8 image (H, W, 3) or None, and the prompt."""
        raise NotImplementedError

    def decode(self, token_ids, skip_special_tokens=True) -> str:
        """Turn generated token ids into text."""
        raise NotImplementedError
