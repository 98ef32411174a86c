"""The small interface between a model family and the runtimes."""

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

from vlm_ros.engine.chat_template import CONTROL_END, CONTROL_START
from vlm_ros.engine.errors import ModelFilesError, UnsupportedModelError


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


class TemplatedFamily(ModelFamily):
    """
    Prompt assembly shared by families with a Hugging Face tokenizer and chat template.

    The chat template writes one placeholder per image (``_placeholder``, a compiled regex);
    each is replaced by the family's expansion for that image, the text is tokenized, and the
    count of image tokens is checked against what the vision encoder will produce.
    Subclasses provide ``preprocess``, ``render``, ``expand_image`` and ``image_tokens_for``,
    and set ``tokenizer``, ``image_token``, ``image_token_id`` and ``_placeholder``.
    """

    placeholder_label = ''
    """How errors name the template's image placeholder (default: ``image_token``)."""

    def preprocess(self, image, image_options):
        """Return (vision_inputs, plan) for an image."""
        raise NotImplementedError

    def render(self, prompt, system_prompt='', num_images=0) -> str:
        """Render the chat-template prompt with one placeholder per image."""
        raise NotImplementedError

    def expand_image(self, plan) -> str:
        """Return the text one image of this ``plan`` expands to."""
        raise NotImplementedError

    def image_tokens_for(self, plan) -> int:
        """Return how many image tokens the vision encoder produces for ``plan``."""
        raise NotImplementedError

    def prepare(self, image, prompt, system_prompt='', image_options=None) -> PreparedRequest:
        """Build the request for an image (anything ``images.to_rgb`` takes) or None."""
        vision_inputs, plan = {}, None
        if image is not None:
            vision_inputs, plan = self.preprocess(image, image_options)
        wanted = 0 if plan is None else 1
        text = self.render(prompt, system_prompt or '', wanted)
        found = len(self._placeholder.findall(text))
        if found != wanted:
            raise UnsupportedModelError(
                f'the chat template wrote {found} {self.placeholder_label or self.image_token}'
                f' placeholders for {wanted} image(s)')
        if plan is not None:
            expansion = self.expand_image(plan)
            text = self._placeholder.sub(lambda _: expansion, text)
        input_ids = np.asarray(self.tokenizer.encode_marked(text), dtype=np.int64)
        num_image_tokens = int(np.count_nonzero(input_ids == self.image_token_id))
        expected = 0 if plan is None else self.image_tokens_for(plan)
        if num_image_tokens != expected:
            raise ModelFilesError(
                f'the prompt holds {num_image_tokens} {self.image_token} ids, expected '
                f'{expected}: tokenizer.json does not keep {self.image_token!r} whole')
        readable = text.replace(CONTROL_START, '').replace(CONTROL_END, '')
        return PreparedRequest(input_ids=input_ids, vision_inputs=vision_inputs,
                               image_token_id=self.image_token_id,
                               num_image_tokens=num_image_tokens, prompt_text=readable)

    def decode(self, token_ids, skip_special_tokens=True) -> str:
        """Turn generated ids into text with the model's tokenizer."""
        return self.tokenizer.decode(token_ids, skip_special_tokens)
