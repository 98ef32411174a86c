"""
What a model family is: its declaration for the registry, and the interface the pipeline uses.

A family turns images and text into a ``PreparedRequest`` (preprocessing, prompt layout, chat
template, special tokens) and turns generated ids back into text. It never touches a runtime:
the runtimes consume what it prepares. Each family class declares a ``FamilyInfo``; the
registry (``families.registry``) collects those declarations, so adding a family is adding
one module here.
"""

from dataclasses import dataclass
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from vlm_ros.engine import images as image_utils
from vlm_ros.engine.chat_template import (build_messages, ChatTemplate, CONTROL_END,
                                          CONTROL_START, control_token_pattern,
                                          mark_control_tokens)
from vlm_ros.engine.datatypes import PreparedRequest
from vlm_ros.engine.errors import (ImageError, ModelFilesError, ModelMismatchError,
                                   UnsupportedModelError)
from vlm_ros.engine.model_files import load_json, text_config


@dataclass(frozen=True)
class FamilyInfo:
    """How users and files name a family: everything the registry needs to find it."""

    key: str
    """Short name: the library's ``model_type`` argument (e.g. ``smolvlm``)."""
    model_type_param: int
    """Value of the node's ``model_type`` parameter."""
    display_name: str
    """For parameter descriptions and errors (e.g. ``SmolVLM/SmolVLM2``)."""
    config_model_types: Tuple[str, ...]
    """``model_type`` values of ``config.json`` that this family reads."""
    mmproj_projectors: Tuple[str, ...] = ()
    """``clip.projector_type`` values of the llama.cpp projectors (mmproj GGUFs) it accepts."""
    fallback_chat_template: str = ''
    """Chat template for GGUFs converted without one (libmtmd path), with
    ``image_placeholder`` for each image; written for this project to render what the
    family's published template renders."""
    image_placeholder: str = '<image>'
    """What the family's chat template (the GGUF's own or the fallback) writes for one
    image: the libmtmd path replaces it with its media marker."""
    default: bool = False
    """The family of the embedded default model (the node's default ``model_type``)."""
    box_format: str = ''
    """How its answers write boxes (``engine.grounding``: ``normalized_1000`` or
    ``absolute``); '' when it was not trained to locate objects."""
    grounding_prompt: str = ''
    """The question it was trained to answer with boxes: ``{label}`` for one question per
    label, ``{labels}`` for one about all of them."""
    grounding_tokens: Tuple[str, ...] = ()
    """Special tokens of its box syntax (Qwen2-VL's object and box markers): its grounding
    question may hold them as tokens, and decoded answers keep them, so boxes can be read."""


class ModelFamily:
    """
    Preprocessing, prompt layout and special tokens of one model family.

    Subclasses read every constant from the model's own files in ``model_dir`` and set
    ``info`` to their declaration (families without one, like the GGUF chat family, are not
    registered).
    """

    info: Optional[FamilyInfo] = None
    name = ''
    eos_token_ids: List[int] = []
    context_length = 0
    text_hidden_size = 0
    vision_heads = 0
    """Attention heads of the vision encoder (0: unknown; its attention is not fused)."""
    vision_hidden_size = 0

    @classmethod
    def info_for(cls, source: str) -> FamilyInfo:
        """
        Return the declaration for one checkpoint of this family.

        ``source`` is what names the checkpoint: its ``config.json`` ``model_type`` or its
        mmproj's ``clip.projector_type``. A family whose checkpoints answer differently
        (box syntax, grounding question) overrides this; by default every checkpoint has
        ``info``.
        """
        return cls.info

    def prepare(self, images, prompt, system_prompt='', image_options=None,
                history=(), skip=()) -> PreparedRequest:
        """
        Build the request for ``images`` (None, one image or a list), the prompt and history.

        ``history`` holds earlier turns, alternating user and assistant, oldest first (see
        ``conversation``; a user turn may show images). ``skip``: indices (in prompt order,
        the history's images first) of images whose features are known (a cache): they are
        laid out in the prompt but not preprocessed.
        """
        raise NotImplementedError

    def decode(self, token_ids, skip_special_tokens=True) -> str:
        """Turn generated token ids into text."""
        raise NotImplementedError

    @classmethod
    def mtmd_image_fitter(cls, bounds: Optional[Tuple[int, int]] = None):
        """
        Return a function resizing an RGB image as the processor would before libmtmd, or None.

        For projectors that keep an image already on their grid (Qwen2-VL's), the family's
        own resize (the processor's filter and rounding) replaces libmtmd's; ``bounds`` are
        the (min, max) tokens per image libmtmd was given (None: its own).
        """
        return None

    def image_token_bounds(self) -> Optional[Tuple[int, int]]:
        """
        Return (min, max) tokens per image where the processor resizes to a token budget.

        libmtmd then lays images out as the processor would (Qwen2-VL); None: the image
        size does not set the token count, or libmtmd's own bounds apply.
        """
        return None


def decode_keeping(token_ids, kept: Dict[int, str], decode_run) -> str:
    """
    Decode ``token_ids`` with special tokens skipped, except the ``kept`` ones (id -> text).

    ``decode_run(ids)`` decodes a run of ids without special tokens; the kept markers (a
    family's grounding markers) are written between the runs as themselves.
    """
    pieces, run = [], []
    for token_id in token_ids:
        marker = kept.get(int(token_id))
        if marker is None:
            run.append(token_id)
            continue
        pieces += [decode_run(run), marker]
        run = []
    pieces.append(decode_run(run))
    return ''.join(pieces)


def image_list(images) -> List[np.ndarray]:
    """Return ``images`` (None, one image, or a list or tuple of them) as RGB uint8 arrays."""
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return [image_utils.to_rgb(image) for image in images]
    return [image_utils.to_rgb(images)]


def conversation(images, history):
    """
    Return ``(rgbs, turns)``: every image of the request in prompt order, and the history.

    ``history`` holds earlier turns, alternating user and assistant, oldest first, ending
    with an assistant turn: each a string, or (user turns) ``{'text': ..., 'images': [...]}``
    for a turn that showed images. ``turns`` is ``[(text, image_count), ...]``; ``rgbs`` has
    the history's images first, then ``images``.
    """
    items = list(history or ())
    if len(items) % 2:
        raise UnsupportedModelError(
            f'history must alternate user and assistant turns and end with an assistant '
            f'turn (got {len(items)} turns)')
    rgbs, turns = [], []
    for i, item in enumerate(items):
        text, shown = item, []
        if isinstance(item, dict):
            text, shown = item.get('text', ''), image_list(item.get('images'))
            if shown and i % 2:
                raise UnsupportedModelError(f'history turn {i} is an assistant turn: it '
                                            'cannot show images')
        if not isinstance(text, str):
            raise UnsupportedModelError(f'history turn {i} must be a string or a dict with '
                                        f"'text' (got {type(text).__name__})")
        rgbs += shown
        turns.append((text, len(shown)))
    return rgbs + image_list(images), turns


# -- reading a model folder: what every Hugging Face layout family needs ---------------------

def read_config(model_dir, model_types: Sequence[str]):
    """
    Return ``(config, text_config, context_length, hidden_size)`` from ``config.json``.

    Raises UnsupportedModelError when its ``model_type`` is not one of ``model_types``.
    """
    config = load_json(model_dir, 'config.json')
    model_type = config.get('model_type', '')
    if model_type not in model_types:
        raise UnsupportedModelError(f'{model_dir}/config.json has model_type {model_type!r}; '
                                    f'this family handles {tuple(model_types)}')
    text = text_config(config)
    try:
        return config, text, int(text['max_position_embeddings']), int(text['hidden_size'])
    except (KeyError, TypeError, ValueError) as exc:
        key = 'llm_config' if 'llm_config' in config else 'text_config'
        raise ModelFilesError(f'{model_dir}/config.json lacks {key}.{exc}') from exc


def vision_shape(config) -> Tuple[int, int]:
    """Return ``(attention heads, hidden size)`` of ``config``'s vision encoder, 0 if unsaid."""
    vision = config.get('vision_config') or {}
    try:
        return int(vision.get('num_attention_heads') or 0), int(vision.get('hidden_size') or 0)
    except (TypeError, ValueError):
        return 0, 0


def int_list(value) -> List[int]:
    """Return an int or a list of ints (as config files write token ids) as a list."""
    if value is None:
        return []
    values = value if isinstance(value, (list, tuple)) else [value]
    return [int(v) for v in values if isinstance(v, int) and not isinstance(v, bool)]


def read_eos_ids(model_dir, config, text, tokenizer, with_tokenizer_eos=False) -> List[int]:
    """
    End-of-sequence ids as transformers' ``generate`` collects them.

    ``generation_config.json``, then ``config.json`` and its text part; with
    ``with_tokenizer_eos`` the tokenizer's EOS token too. The tokenizer's EOS alone when the
    files name none.
    """
    generation = load_json(model_dir, 'generation_config.json', required=False)
    eos = int_list(generation.get('eos_token_id')) + int_list(config.get('eos_token_id')) \
        + int_list(text.get('eos_token_id'))
    tokenizer_eos = tokenizer.token_to_id(tokenizer.eos_token or '')
    if with_tokenizer_eos and tokenizer_eos is not None:
        eos.append(tokenizer_eos)
    eos = list(dict.fromkeys(eos))
    if not eos:
        if tokenizer_eos is None:
            raise ModelFilesError(f'no eos_token_id in {model_dir}/generation_config.json or '
                                  'config.json, and the tokenizer has no eos_token')
        eos = [tokenizer_eos]
    return eos


def parse_resample(value, source) -> int:
    """Return the PIL filter number of a ``resample`` setting (number or name)."""
    resample = value
    if isinstance(resample, str):
        names = {v: k for k, v in image_utils.RESAMPLE_NAMES.items()}
        resample = names.get(resample.lower(), resample)
    if resample not in image_utils.RESAMPLE_NAMES:
        raise UnsupportedModelError(f'{source}: resample {value!r} is not a PIL filter this '
                                    f'engine knows {image_utils.RESAMPLE_NAMES}')
    return resample


def three_floats(value, name, source) -> List[float]:
    """Return a per-channel setting (one number or three) as three floats."""
    values = [float(value)] * 3 if isinstance(value, (int, float)) else \
        [float(v) for v in value]
    if len(values) != 3:
        raise ModelFilesError(f'{source}: {name} needs 3 values, got {value!r}')
    return values


class TemplatedFamily(ModelFamily):
    """
    Prompt assembly shared by families with a Hugging Face tokenizer and chat template.

    The chat template writes one placeholder per image (``_placeholder``, a compiled regex);
    each is replaced by the family's expansion for its image, in order, the text is
    tokenized, and the count of image tokens is checked against what the vision encoder will
    produce. Several images are laid out as the processors do: their vision inputs are
    concatenated along the frame axis (``frame_axis``), in prompt order.
    Subclasses provide ``preprocess``, ``render``, ``expand_image`` and ``image_tokens_for``,
    and set ``tokenizer``, ``image_token``, ``image_token_id`` and ``_placeholder``.
    """

    placeholder_label = ''
    """How errors name the template's image placeholder (default: ``image_token``)."""
    frame_axis = 0
    """Axis of the vision inputs along which several images' frames are concatenated."""

    def read_chat_template(self, model_dir, placeholder, allowed_tokens=()):
        """
        Read the model's chat template; ``placeholder`` is what it writes for an image.

        Control tokens in user text are escaped except ``allowed_tokens``; only placeholders
        the template wrote expand (a user's marked copy stays text).
        """
        self.chat_template = ChatTemplate.from_model_dir(model_dir,
                                                         self.tokenizer.special_tokens)
        self._control = control_token_pattern(
            [t for t in self.tokenizer.control_tokens(self.chat_template.source)
             if t not in allowed_tokens])
        self._placeholder = re.compile(f'(?<!{CONTROL_START}){re.escape(placeholder)}')

    def special_token_ids(self, model_dir, tokens) -> List[int]:
        """Return the tokenizer's id of each of ``tokens``; a missing one is an error."""
        ids = []
        for token in tokens:
            token_id = self.tokenizer.token_to_id(token)
            if token_id is None:
                raise ModelFilesError(f'{model_dir}/tokenizer.json has no token {token!r}')
            ids.append(token_id)
        return ids

    @staticmethod
    def check_config_token_id(model_dir, key, configured, token, token_id):
        """Refuse a ``config.json`` id (``key``: ``configured``) the tokenizer contradicts."""
        if configured is not None and int(configured) != token_id:
            raise ModelMismatchError(
                f'{model_dir}: config.json says {key} {configured}, but the tokenizer maps '
                f'{token!r} to {token_id}')

    def read_pixel_settings(self, cfg, source):
        """
        Read a preprocessor config's resampling filter, rescale and normalisation settings.

        Sets ``resample``, ``do_rescale``, ``rescale_factor``, ``do_normalize``,
        ``image_mean``, ``image_std`` and the lookup tables ``images.apply_tables`` uses;
        ``source`` names the file in errors.
        """
        self.resample = parse_resample(cfg['resample'], source)
        self.do_rescale = bool(cfg['do_rescale'])
        self.do_normalize = bool(cfg['do_normalize'])
        self.rescale_factor = float(cfg['rescale_factor'])
        self.image_mean = three_floats(cfg['image_mean'], 'image_mean', source)
        self.image_std = three_floats(cfg['image_std'], 'image_std', source)
        self._tables = image_utils.normalize_tables(self.rescale_factor, self.image_mean,
                                                    self.image_std, self.do_rescale,
                                                    self.do_normalize)

    def preprocess(self, image, image_options):
        """Return (vision_inputs, plan) for an image."""
        raise NotImplementedError

    def render(self, prompt, system_prompt='', num_images=0, turns=()) -> str:
        """Render the chat-template prompt with one placeholder per image (``conversation``)."""
        raise NotImplementedError

    def expand_image(self, plan) -> str:
        """Return the text one image of this ``plan`` expands to."""
        raise NotImplementedError

    def image_tokens_for(self, plan) -> int:
        """Return how many image tokens the vision encoder produces for ``plan``."""
        raise NotImplementedError

    def messages(self, prompt, system_prompt='', num_images=0, turns=()):
        """Return the conversation in transformers' content-list form, user text marked."""
        messages = build_messages(prompt, system_prompt, num_images, turns)
        return mark_control_tokens(messages, self._control)

    def plan(self, height, width, image_options=None):
        """Return how an image of this size is cut (its ``plan``), without touching pixels."""
        raise NotImplementedError

    def prepare(self, images, prompt, system_prompt='', image_options=None,
                history=(), skip=()) -> PreparedRequest:
        """Build the request for images (anything ``images.to_rgb`` takes), prompt, history."""
        rgbs, turns = conversation(images, history)
        prepared = [({}, self.plan(rgb.shape[0], rgb.shape[1], image_options)) if i in skip
                    else self.preprocess(rgb, image_options) for i, rgb in enumerate(rgbs)]
        current = len(rgbs) - sum(n for _, n in turns)
        text = self.render(prompt, system_prompt or '', current, turns)
        found = len(self._placeholder.findall(text))
        if found != len(rgbs):
            raise UnsupportedModelError(
                f'the chat template wrote {found} {self.placeholder_label or self.image_token}'
                f' placeholders for {len(rgbs)} image(s)')
        expansions = iter([self.expand_image(plan) for _, plan in prepared])
        text = self._placeholder.sub(lambda _: next(expansions), text)
        input_ids = np.asarray(self.tokenizer.encode_marked(text), dtype=np.int64)
        num_image_tokens = int(np.count_nonzero(input_ids == self.image_token_id))
        expected = sum(self.image_tokens_for(plan) for _, plan in prepared)
        if num_image_tokens != expected:
            raise ModelFilesError(
                f'the prompt holds {num_image_tokens} {self.image_token} ids, expected '
                f'{expected}: tokenizer.json does not keep {self.image_token!r} whole')
        readable = text.replace(CONTROL_START, '').replace(CONTROL_END, '')
        return PreparedRequest(input_ids=input_ids,
                               vision_inputs=self._concatenate([v for v, _ in prepared if v]),
                               image_token_id=self.image_token_id,
                               num_image_tokens=num_image_tokens, prompt_text=readable,
                               images=rgbs, image_inputs=[v for v, _ in prepared],
                               image_token_counts=[self.image_tokens_for(p)
                                                   for _, p in prepared])

    def _concatenate(self, inputs):
        """Join several images' vision inputs along ``frame_axis``, padding frame sides."""
        if len(inputs) <= 1:
            return inputs[0] if inputs else {}
        joined = {}
        for name in inputs[0]:
            arrays = [v[name] for v in inputs]
            if any(a.shape[self.frame_axis + 1:] != arrays[0].shape[self.frame_axis + 1:]
                   for a in arrays):
                raise ImageError(f'the images give {name} frames of different shapes; ask '
                                 'about them one at a time')
            joined[name] = np.concatenate(arrays, axis=self.frame_axis)
        return joined

    def decode(self, token_ids, skip_special_tokens=True) -> str:
        """Turn generated ids into text with the model's tokenizer."""
        return self.tokenizer.decode(token_ids, skip_special_tokens)
