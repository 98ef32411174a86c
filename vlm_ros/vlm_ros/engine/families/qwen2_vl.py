"""
Qwen2-VL and Qwen2.5-VL (VLM-R1 too): image patches, prompt layout and M-RoPE positions.

The image path is transformers' PIL image processor (``Qwen2VLImageProcessorPil``, which
``AutoProcessor`` builds for both families), step by step and with its rounding:

1. ``smart_resize``: each side rounded to a multiple of patch x merge (28 on the published
   models), then both scaled together into [min_pixels, max_pixels]; an aspect ratio over
   200 is refused;
2. Pillow resize of the uint8 RGB image with the configured filter (bicubic);
3. rescale and normalise (float64 multiply, float32 ``(x - mean) / std``);
4. the still image repeated to ``temporal_patch_size`` frames and cut into patches of
   ``C x T x P x P`` values, the patches of each merge x merge block consecutive, blocks
   row by row: ``pixel_values`` [grid_h * grid_w, C*T*P*P] and ``image_grid_thw`` [1, 3]
   = (1, grid_h, grid_w).

For the project's ONNX vision encoder (``vision_encoder.onnx`` of the tools' Qwen2-VL export),
whose graph holds nothing that depends on the grid, each image also gets its patches' 2-D
rotary tables and, for Qwen2.5-VL, their attention windows (``vision_tower_inputs``); an
encoder reads only the inputs it declares.

The pixel budget comes from ``preprocessor_config.json`` as transformers reads it:
``size`` (``shortest_edge`` / ``longest_edge`` are min / max pixels), overridden by top-level
``min_pixels`` / ``max_pixels`` (the published files give those). Several images are
concatenated along the patch axis, in prompt order, as the processor does.

The prompt is the model's own chat template; each ``<|image_pad|>`` it writes (between
``<|vision_start|>`` and ``<|vision_end|>``) becomes grid_h * grid_w / merge**2 copies. The
language model places tokens by multi-axis rotary positions (M-RoPE): text advances all three
axes together, an image's tokens take (temporal, row, column) offsets from the position after
the text before it, and the text after it resumes past its larger side
(``rope_positions``, transformers' ``get_rope_index`` for images).

``ImageOptions``' tiling knobs do not apply: there are no tiles, the image is resized to the
model's pixel budget. Special-token strings in user text are encoded as plain text, as
transformers does with ``sanitize_control_tokens=True``, except Qwen2-VL's grounding markers
(its grounding question is written with them).

Grounding differs per checkpoint, so the family declares two variants (``info_for``): Qwen2-VL
answers ``<|object_ref_start|>cup<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>``
in 0-1000 of the image; Qwen2.5-VL and VLM-R1 answer JSON ``bbox_2d`` boxes in pixels of the
image they saw (``PreparedRequest.seen_sizes``).
"""

from dataclasses import dataclass, replace
import functools
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from vlm_ros.engine import grounding, images
from vlm_ros.engine.datatypes import ImageOptions, PreparedRequest
from vlm_ros.engine.errors import ImageError, ModelFilesError, ModelMismatchError
from vlm_ros.engine.families.base import (decode_keeping, FamilyInfo, read_config,
                                          read_eos_ids, TemplatedFamily)
from vlm_ros.engine.model_files import load_json
from vlm_ros.engine.tokenizer import Tokenizer

QWEN2_VL = 'qwen2_vl'
QWEN25_VL = 'qwen2_5_vl'
MODEL_TYPES = (QWEN2_VL, QWEN25_VL)
# llama.cpp's clip.projector_type of each family's mmproj.
QWEN2_VL_PROJECTOR = 'qwen2vl_merger'
QWEN25_VL_PROJECTOR = 'qwen2.5vl_merger'
PROJECTORS = (QWEN2_VL_PROJECTOR, QWEN25_VL_PROJECTOR)

VISION_START_TOKEN = '<|vision_start|>'
VISION_END_TOKEN = '<|vision_end|>'
IMAGE_TOKEN = '<|image_pad|>'
IMAGE_PLACEHOLDER = VISION_START_TOKEN + IMAGE_TOKEN + VISION_END_TOKEN
"""What the chat template writes for one image."""
GROUNDING_TOKENS = ('<|object_ref_start|>', '<|object_ref_end|>', '<|box_start|>',
                    '<|box_end|>', '<|quad_start|>', '<|quad_end|>')
"""Qwen2-VL's markers of referred phrases, boxes and quadrilaterals."""

MAX_ASPECT_RATIO = 200
"""The processor refuses images whose long side exceeds this many times the short one."""
# Qwen2VLImageProcessorPil class defaults, used when the preprocessor config omits a key.
DEFAULTS = {
    'do_resize': True, 'resample': 3, 'do_rescale': True, 'rescale_factor': 1.0 / 255.0,
    'do_normalize': True, 'image_mean': [0.48145466, 0.4578275, 0.40821073],
    'image_std': [0.26862954, 0.26130258, 0.27577711], 'patch_size': 14,
    'temporal_patch_size': 2, 'merge_size': 2,
}
LIBMTMD_IMAGE_TOKENS = (8, 4096)
"""The tokens per image libmtmd allows Qwen2-VL's projectors unless told otherwise."""
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280

# Written for this project: what the published Qwen2-VL / Qwen2.5-VL template renders for
# text and images (a default system turn when the conversation has none).
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}'
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% else %}" + IMAGE_PLACEHOLDER +
    '{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}'
    '{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}')

_COMMON = {
    'key': QWEN2_VL, 'model_type_param': 2, 'display_name': 'Qwen2-VL/Qwen2.5-VL',
    'config_model_types': MODEL_TYPES, 'mmproj_projectors': PROJECTORS,
    'fallback_chat_template': FALLBACK_CHAT_TEMPLATE, 'image_placeholder': IMAGE_PLACEHOLDER,
}
QWEN25_VL_INFO = FamilyInfo(**_COMMON, box_format=grounding.ABSOLUTE,
                            grounding_prompt=grounding.QWEN25VL_PROMPT)
"""Qwen2.5-VL and VLM-R1: JSON boxes in pixels of the image the model saw."""
QWEN2_VL_INFO = replace(QWEN25_VL_INFO, box_format=grounding.NORMALIZED_1000,
                        grounding_prompt=grounding.QWEN2VL_PROMPT,
                        grounding_tokens=GROUNDING_TOKENS)
"""Qwen2-VL: marked boxes in 0-1000 of the image."""
_VARIANTS = {QWEN2_VL: QWEN2_VL_INFO, QWEN2_VL_PROJECTOR: QWEN2_VL_INFO,
             QWEN25_VL: QWEN25_VL_INFO, QWEN25_VL_PROJECTOR: QWEN25_VL_INFO}


def patchify(pixels: np.ndarray, patch_size: int, merge_size: int,
             temporal_patch_size: int) -> np.ndarray:
    """
    Cut a normalised image [C, H, W] into the processor's flat patches.

    Returns float32 [grid_h * grid_w, C * T * P * P] (T = ``temporal_patch_size``, the still
    image repeated): merge x merge blocks row by row, inside a block its patches row by row,
    each patch's values ordered channel, frame, row, column.
    """
    channels, height, width = pixels.shape
    grid_h, grid_w = height // patch_size, width // patch_size
    if grid_h * patch_size != height or grid_w * patch_size != width or \
            grid_h % merge_size or grid_w % merge_size:
        raise ImageError(f'a {width}x{height} image does not cut into {patch_size}-pixel '
                         f'patches in {merge_size}x{merge_size} blocks')
    blocks = pixels.reshape(channels, grid_h // merge_size, merge_size, patch_size,
                            grid_w // merge_size, merge_size, patch_size)
    # -> (block row, block column, row in block, column in block, C, P, P)
    blocks = blocks.transpose(1, 4, 2, 5, 0, 3, 6)
    frames = np.broadcast_to(blocks[:, :, :, :, :, None],
                             blocks.shape[:5] + (temporal_patch_size,) + blocks.shape[5:])
    return np.ascontiguousarray(frames, dtype=np.float32).reshape(
        grid_h * grid_w, channels * temporal_patch_size * patch_size * patch_size)


def rope_positions(input_ids, grids: Sequence[Sequence[int]], image_token_id: int,
                   merge_size: int = 2) -> np.ndarray:
    """
    Return the M-RoPE positions int64 [3, seq] of a prompt (transformers' ``get_rope_index``).

    ``grids`` holds each image's (grid_t, grid_h, grid_w) in prompt order; each run of
    ``image_token_id`` is one image. Text tokens advance the three axes together; an image
    starting at position p gives its token at (t, row, column) of the merged grid the
    positions (p + t, p + row, p + column), and the text after it continues at
    p + max(grid_h, grid_w) / merge_size. Raises ValueError when the runs of image tokens and
    the grids do not match.
    """
    ids = np.asarray(input_ids).reshape(-1)
    positions = np.empty((3, ids.size), dtype=np.int64)
    is_image = ids == image_token_id
    edges = np.flatnonzero(np.diff(is_image.astype(np.int8))) + 1
    bounds = [0, *edges.tolist(), ids.size]
    pending = [tuple(int(v) for v in grid) for grid in grids]
    pending.reverse()
    current = 0
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        if start == end:
            continue
        if not is_image[start]:
            positions[:, start:end] = np.arange(current, current + end - start)
            current += end - start
            continue
        if not pending:
            raise ValueError(f'image tokens at {start}:{end} but no grid left for them')
        grid_t, grid_h, grid_w = pending.pop()
        t, h, w = grid_t, grid_h // merge_size, grid_w // merge_size
        if t * h * w != end - start:
            raise ValueError(f'image tokens at {start}:{end} ({end - start}) do not fill the '
                             f'grid {(grid_t, grid_h, grid_w)} ({t * h * w} merged tokens)')
        axes = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing='ij')
        positions[:, start:end] = np.stack([a.reshape(-1) for a in axes]) + current
        current += max(grid_h, grid_w) // merge_size
    if pending:
        raise ValueError(f'{len(pending)} image grid(s) left without image tokens')
    return positions


def fit_to_grid(rgb: np.ndarray, factor: int, min_pixels: int, max_pixels: int,
                resample: int) -> np.ndarray:
    """Resize an RGB uint8 image as the processor does (``smart_resize``, then Pillow)."""
    height, width = rgb.shape[:2]
    if max(height, width) > MAX_ASPECT_RATIO * max(1, min(height, width)):
        raise ImageError(f'a {width}x{height} image has an aspect ratio over '
                         f'{MAX_ASPECT_RATIO}, which Qwen2-VL refuses')
    h, w = grounding.smart_resize(height, width, factor, min_pixels, max_pixels)
    return images.resize(rgb, h, w, resample)


def vision_tower_inputs(grid: Sequence[int], head_dim: int, merge_size: int,
                        window_patches: int = 0, theta: float = 10000.0
                        ) -> Dict[str, np.ndarray]:
    """
    Return what the vision tower computes from an image's grid, for its patches in order.

    ``rotary_cos`` / ``rotary_sin`` float32 [patches, head_dim]: the angles of each patch's
    row (first quarter of the frequencies) and column (second), repeated for both halves, as
    the towers' axial rotary embedding computes them in float32. ``window_patches`` > 0
    (Qwen2.5-VL: window_size / patch size) adds ``window_ids`` int64 [patches]: the window
    of merge blocks each patch attends within, windows numbered row by row.
    """
    t, h, w = (int(x) for x in grid)
    m = merge_size
    shape = (t, h // m, m, w // m, m)
    block_major = (0, 1, 3, 2, 4)  # the processor's patch order: blocks, then inside
    rows = np.broadcast_to(np.arange(h).reshape(1, h // m, m, 1, 1), shape)
    rows = rows.transpose(block_major).reshape(-1)
    cols = np.broadcast_to(np.arange(w).reshape(1, 1, 1, w // m, m), shape)
    cols = cols.transpose(block_major).reshape(-1)
    quarter = head_dim // 2
    inv_freq = (1.0 / (theta ** (np.arange(0, quarter, 2, dtype=np.float32) / quarter))
                ).astype(np.float32)
    angles = np.concatenate([rows[:, None].astype(np.float32) * inv_freq,
                             cols[:, None].astype(np.float32) * inv_freq], axis=1)
    cos, sin = np.cos(angles), np.sin(angles)
    out = {'rotary_cos': np.concatenate([cos, cos], axis=1).astype(np.float32),
           'rotary_sin': np.concatenate([sin, sin], axis=1).astype(np.float32)}
    if window_patches > 0:
        side = max(1, window_patches // m)  # merge blocks per window side
        across = -(-(w // m) // side)
        down = -(-(h // m) // side)
        frames = np.broadcast_to(np.arange(t).reshape(t, 1, 1, 1, 1), shape)
        frames = frames.transpose(block_major).reshape(-1)
        out['window_ids'] = ((frames * down + rows // m // side) * across
                             + cols // m // side).astype(np.int64)
    return out


@dataclass(frozen=True)
class ImagePlan:
    """How one image is processed: the size it is resized to and its patch grid."""

    height: int
    width: int
    """The size the model sees (after ``smart_resize``)."""
    grid_h: int
    grid_w: int
    merge_size: int
    grid_t: int = 1

    @property
    def grid(self) -> Tuple[int, int, int]:
        """Return ``image_grid_thw`` (temporal, height, width patches)."""
        return self.grid_t, self.grid_h, self.grid_w

    @property
    def num_tokens(self) -> int:
        """Return how many image tokens the merger produces."""
        return self.grid_t * self.grid_h * self.grid_w // (self.merge_size ** 2)


def _positive_int(cfg, name, source) -> int:
    value = cfg.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ModelFilesError(f'{source}: {name} must be a positive int, got {value!r}')
    return value


def mrope_section(config, text) -> List[int]:
    """
    Return the M-RoPE section sizes (temporal, height, width) of ``config.json``.

    Read from the text config's ``rope_parameters`` (transformers 5) or a ``rope_scaling``
    of the text config or the top level (the published files). Raises ModelFilesError when
    none names them.
    """
    for holder in (text, config):
        for key in ('rope_parameters', 'rope_scaling'):
            section = (holder.get(key) or {}).get('mrope_section')
            if isinstance(section, (list, tuple)) and len(section) == 3 and \
                    all(isinstance(v, int) and v > 0 for v in section):
                return [int(v) for v in section]
    raise ModelFilesError('config.json names no mrope_section (in rope_parameters or '
                          'rope_scaling): this is not a Qwen2-VL language model')


class Qwen2VLFamily(TemplatedFamily):
    """Qwen2-VL / Qwen2.5-VL / VLM-R1: every constant from the model directory's files."""

    info = QWEN25_VL_INFO
    """The class declares Qwen2.5-VL's answers; an instance has its checkpoint's
    (``info_for``)."""
    placeholder_label = IMAGE_TOKEN

    @classmethod
    def info_for(cls, source: str) -> FamilyInfo:
        """
        Return Qwen2-VL's or Qwen2.5-VL's declaration for a config type or projector type.

        ``qwen2_vl`` / ``qwen2vl_merger``: boxes in 0-1000 with Qwen2-VL's markers;
        ``qwen2_5_vl`` / ``qwen2.5vl_merger`` (VLM-R1 too): JSON boxes in pixels of the image
        the model saw. Anything else: the class's ``info``.
        """
        return _VARIANTS.get(source, cls.info)

    def __init__(self, model_dir):
        self.model_dir = model_dir
        config, text, self.context_length, self.text_hidden_size = read_config(
            model_dir, MODEL_TYPES)
        self.name = config['model_type']
        self.info = self.info_for(self.name)
        # The ONNX attention fusion knows SigLIP-like encoders only; this one is not.
        self.vision_heads = self.vision_hidden_size = 0
        self.mrope_section = mrope_section(config, text)
        self._read_preprocessor(model_dir)
        self._check_vision_config(model_dir, config)
        self._read_vision_tower(config)
        self.tokenizer = Tokenizer(model_dir)
        self._read_tokens(model_dir, config)
        self.eos_token_ids = read_eos_ids(model_dir, config, text, self.tokenizer)
        # The grounding markers stay tokens in user text: the grounding question holds them.
        self.read_chat_template(model_dir, self.image_token, set(self.info.grounding_tokens))
        self._kept = {self.tokenizer.token_to_id(t): t for t in self.info.grounding_tokens
                      if self.tokenizer.token_to_id(t) is not None}

    # Model files.

    def _read_preprocessor(self, model_dir):
        # transformers prefers a processor_config.json that nests the image processor's.
        nested = load_json(model_dir, 'processor_config.json', required=False).get(
            'image_processor')
        if isinstance(nested, dict):
            source, given = f'{model_dir}/processor_config.json', nested
        else:
            source = f'{model_dir}/preprocessor_config.json'
            given = load_json(model_dir, 'preprocessor_config.json')
        cfg = {**DEFAULTS, **{k: v for k, v in given.items() if v is not None}}
        self.min_pixels, self.max_pixels = self._pixel_budget(given, source)
        self.do_resize = bool(cfg['do_resize'])
        self.read_pixel_settings(cfg, source)
        self.patch_size = _positive_int(cfg, 'patch_size', source)
        self.temporal_patch_size = _positive_int(cfg, 'temporal_patch_size', source)
        self.merge_size = _positive_int(cfg, 'merge_size', source)

    @staticmethod
    def _pixel_budget(given, source) -> Tuple[int, int]:
        """
        Return (min_pixels, max_pixels) as the image processor's constructor settles them.

        ``size`` (``shortest_edge`` / ``longest_edge``; older files ``min_pixels`` /
        ``max_pixels``) or the class default, then top-level ``min_pixels`` / ``max_pixels``
        over it.
        """
        size = given.get('size')
        if size is None:
            size = {'shortest_edge': DEFAULT_MIN_PIXELS, 'longest_edge': DEFAULT_MAX_PIXELS}
        if not isinstance(size, dict):
            raise ModelFilesError(f"{source}: size must be a dict with 'shortest_edge' and "
                                  f"'longest_edge', got {size!r}")
        low = size.get('shortest_edge', size.get('min_pixels'))
        high = size.get('longest_edge', size.get('max_pixels'))
        if given.get('min_pixels') is not None:
            low = given['min_pixels']
        if given.get('max_pixels') is not None:
            high = given['max_pixels']
        budget = {'min_pixels': low, 'max_pixels': high}
        for name, value in budget.items():
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ModelFilesError(f'{source}: {name} (size.shortest_edge / longest_edge) '
                                      f'must be a positive int, got {value!r}')
        if low > high:
            raise ModelFilesError(f'{source}: min_pixels {low} exceeds max_pixels {high}')
        return low, high

    def _check_vision_config(self, model_dir, config):
        vision = config.get('vision_config') or {}
        for ours, theirs in (('patch_size', 'patch_size'), ('merge_size', 'spatial_merge_size'),
                             ('temporal_patch_size', 'temporal_patch_size')):
            value = vision.get(theirs)
            if value is not None and int(value) != getattr(self, ours):
                raise ModelMismatchError(
                    f'{model_dir}: the preprocessor config says {ours} {getattr(self, ours)} '
                    f'but config.json vision_config.{theirs} is {value}')

    def _read_vision_tower(self, config):
        """Read what ``vision_tower_inputs`` needs: the tower's head size and window."""
        vision = config.get('vision_config') or {}
        # Qwen2-VL's tower width is embed_dim (its hidden_size is the language model's).
        width = int(vision.get('embed_dim') or vision.get('hidden_size') or 0)
        heads = int(vision.get('num_heads') or 0)
        self.vision_head_dim = width // heads if width and heads else 0
        window = int(vision.get('window_size') or 0) if self.name == QWEN25_VL else 0
        self.window_patches = window // self.patch_size
        rope = vision.get('rope_parameters') or {}
        self.vision_theta = float(rope.get('rope_theta') or 10000.0)

    def _read_tokens(self, model_dir, config):
        tok = self.tokenizer
        # Qwen2VLProcessor takes the tokenizer's image_token when it names one.
        self.image_token = tok.config_token('image_token', IMAGE_TOKEN)
        self.image_token_id, self.vision_start_token_id = self.special_token_ids(
            model_dir, (self.image_token, VISION_START_TOKEN))
        for key, token, token_id in (
                ('image_token_id', self.image_token, self.image_token_id),
                ('vision_start_token_id', VISION_START_TOKEN, self.vision_start_token_id)):
            self.check_config_token_id(model_dir, key, config.get(key), token, token_id)

    # Image side.

    def plan(self, height, width, image_options: Optional[ImageOptions] = None) -> ImagePlan:
        """Size and patch grid for a ``height`` x ``width`` image (no tiling options apply)."""
        if min(height, width) < 1:
            raise ImageError(f'image is empty ({width}x{height} pixels)')
        if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
            raise ImageError(f'a {width}x{height} image has an aspect ratio over '
                             f'{MAX_ASPECT_RATIO}, which {self.info.display_name} refuses')
        factor = self.patch_size * self.merge_size
        if self.do_resize:
            height, width = grounding.smart_resize(height, width, factor, self.min_pixels,
                                                   self.max_pixels)
        elif height % factor or width % factor:
            raise ImageError(f'the preprocessor does not resize (do_resize false), and a '
                             f'{width}x{height} image is not made of {factor}-pixel blocks')
        return ImagePlan(height, width, height // self.patch_size, width // self.patch_size,
                         self.merge_size)

    def preprocess(self, image, image_options: Optional[ImageOptions] = None
                   ) -> Tuple[Dict[str, np.ndarray], ImagePlan]:
        """
        Return the vision inputs and the plan for one image.

        ``pixel_values`` float32 [grid_h * grid_w, C * T * P * P] and ``image_grid_thw``
        int64 [1, 3], as the processor makes them, and the grid's tables for an ONNX vision
        encoder (``vision_tower_inputs``).
        """
        rgb = images.to_rgb(image)
        plan = self.plan(rgb.shape[0], rgb.shape[1], image_options)
        resized = images.resize(rgb, plan.height, plan.width, self.resample)
        pixels = images.apply_tables(resized, self._tables)
        patches = patchify(pixels, self.patch_size, self.merge_size, self.temporal_patch_size)
        grid = np.asarray([plan.grid], dtype=np.int64)
        inputs = {'pixel_values': patches, 'image_grid_thw': grid}
        if self.vision_head_dim:
            inputs.update(vision_tower_inputs(plan.grid, self.vision_head_dim,
                                              self.merge_size, self.window_patches,
                                              self.vision_theta))
        return inputs, plan

    # Text side.

    def render(self, prompt, system_prompt='', num_images=0, turns=()) -> str:
        """Render the chat-template prompt, user text marked, images not yet expanded."""
        messages = self.messages(prompt, system_prompt, num_images, turns)
        return self.chat_template.render(messages, add_generation_prompt=True)

    def expand_image(self, plan) -> str:
        """Return the ``<|image_pad|>`` run one image of this ``plan`` becomes."""
        return self.image_token * plan.num_tokens

    def image_tokens_for(self, plan) -> int:
        """Return grid_t * grid_h * grid_w / merge**2 tokens."""
        return plan.num_tokens

    def prepare(self, images, prompt, system_prompt='', image_options=None,
                history=(), skip=()) -> PreparedRequest:
        """
        Build the request (see ``TemplatedFamily.prepare``), with M-RoPE positions.

        ``positions`` int64 [3, seq] (``rope_positions``); ``seen_sizes`` the (width,
        height) each image is resized to, in prompt order, history included.
        """
        request = super().prepare(images, prompt, system_prompt, image_options, history, skip)
        plans = [self.plan(rgb.shape[0], rgb.shape[1], image_options)
                 for rgb in request.images]
        request.seen_sizes = [(p.width, p.height) for p in plans]
        request.positions = rope_positions(request.input_ids, [p.grid for p in plans],
                                           self.image_token_id, self.merge_size)
        return request

    @classmethod
    def mtmd_image_fitter(cls, bounds: Optional[Tuple[int, int]] = None):
        """
        Return the processor's resize for libmtmd's path, within ``bounds`` tokens per image.

        libmtmd resizes with its own bicubic filter and rounds a half-way side up; an image
        already on the 28-pixel grid within its bounds it keeps as it is. Resized here as the
        processor does (Pillow bicubic, sides rounded half to even), the image reaches the
        projector with the processor's pixels. Published checkpoints' patch (14) and merge
        (2) sizes; ``bounds`` None: libmtmd's own (``LIBMTMD_IMAGE_TOKENS``).
        """
        low, high = bounds or LIBMTMD_IMAGE_TOKENS
        factor = DEFAULTS['patch_size'] * DEFAULTS['merge_size']
        return functools.partial(fit_to_grid, factor=factor, min_pixels=low * factor ** 2,
                                 max_pixels=high * factor ** 2, resample=DEFAULTS['resample'])

    def image_token_bounds(self) -> Tuple[int, int]:
        """Return the processor's pixel budget in merged tokens (min, max) per image."""
        unit = (self.patch_size * self.merge_size) ** 2
        return -(-self.min_pixels // unit), self.max_pixels // unit

    def decode(self, token_ids, skip_special_tokens=True) -> str:
        """
        Turn generated ids into text with the model's tokenizer.

        Skipping special tokens keeps the checkpoint's grounding markers (Qwen2-VL's box
        syntax is made of special tokens; without them its boxes could not be read).
        """
        if not skip_special_tokens or not self._kept:
            return self.tokenizer.decode(token_ids, skip_special_tokens)
        return decode_keeping(token_ids, self._kept,
                              lambda run: self.tokenizer.decode(run, True))
