"""
Idefics3, SmolVLM and SmolVLM2: image tiling and prompt layout, exact to transformers.

The image path is transformers' PIL image processor (``SmolVLMImageProcessorPil`` /
``Idefics3ImageProcessorPil``), step by step and with its rounding:

1. resize so the longest edge is ``size.longest_edge`` (small images are upscaled; the
   other side is truncated and made even; capped at 4096);
2. with splitting: resize both sides up to multiples of the tile (``max_image_size``), cut
   the result into tiles row by row, and append the whole image resized to one tile as the
   global view (an image that is already one tile stays a single frame); without splitting:
   resize to one square tile;
3. rescale and normalise (float64 multiply, float32 ``(x - mean) / std``), pad to the largest
   frame and mark real pixels in ``pixel_attention_mask``.

All resizing is Pillow with the configured filter (LANCZOS on the hub models), on uint8
RGB, as in transformers. The prompt is the model's chat template with ``<image>`` expanded
by the processor's rule: per tile ``<fake_token_around_image><row_r_col_c>`` and
``image_seq_len`` ``<image>`` tokens, a newline after each tile row, one more newline, then
the global view as ``<fake_token_around_image><global-img>``, its ``<image>`` tokens and
``<fake_token_around_image>``.

``ImageOptions.max_tiles`` (not a transformers option): when the configured longest edge
would give a grid of more than ``max_tiles`` tiles, the longest edge is lowered to the
largest multiple of the tile size, n * tile, whose grid has at most ``max_tiles`` tiles
(n = 1 always fits: a single frame). The global view is not counted. Without a cap, or
when the cap does not bind, the result is transformers' exactly.

Special-token strings inside user text (prompt, system prompt) are encoded as plain text,
as transformers does with ``sanitize_control_tokens=True``, so a prompt cannot forge image
placeholders or turn ends.
"""

from dataclasses import dataclass
import math
from typing import Dict, Optional, Tuple

import numpy as np

from vlm_ros.engine import grounding, images
from vlm_ros.engine.datatypes import ImageOptions
from vlm_ros.engine.errors import ImageError, ModelFilesError, ModelMismatchError
from vlm_ros.engine.families.base import (FamilyInfo, read_config, read_eos_ids,
                                          TemplatedFamily, vision_shape)
from vlm_ros.engine.model_files import load_json
from vlm_ros.engine.tokenizer import Tokenizer

MODEL_TYPES = ('smolvlm', 'idefics3')
# transformers' MAX_IMAGE_SIZE: absolute cap on the resized longest edge.
MAX_IMAGE_SIZE = 4096
# Image processor class defaults, used when preprocessor_config.json omits a key.
DEFAULTS = {
    'do_resize': True, 'size': {'longest_edge': 4 * 364}, 'resample': 1,
    'do_rescale': True, 'rescale_factor': 1.0 / 255.0, 'do_normalize': True,
    'image_mean': [0.5, 0.5, 0.5], 'image_std': [0.5, 0.5, 0.5],
    'do_image_splitting': True, 'max_image_size': {'longest_edge': 364}, 'do_pad': True,
}
FAKE_IMAGE_TOKEN = '<fake_token_around_image>'
IMAGE_TOKEN = '<image>'
GLOBAL_IMAGE_TOKEN = '<global-img>'


def rescale_to_longest_edge(height, width, max_len, min_len=1) -> Tuple[int, int]:
    """Size the longest edge to ``max_len``, the other side even (transformers' rule)."""
    aspect_ratio = width / height
    if width >= height:
        width = max_len
        height = int(width / aspect_ratio)
        if height % 2 != 0:
            height += 1
    else:
        height = max_len
        width = int(height * aspect_ratio)
        if width % 2 != 0:
            width += 1
    return max(height, min_len), max(width, min_len)


def scale_below_upper_bound(height, width, max_len=MAX_IMAGE_SIZE) -> Tuple[int, int]:
    """Cap the longest edge at ``max_len`` keeping the aspect ratio (transformers' rule)."""
    aspect_ratio = width / height
    if width >= height and width > max_len:
        width = max_len
        height = int(width / aspect_ratio)
    elif height > width and height > max_len:
        height = max_len
        width = int(height * aspect_ratio)
    return max(height, 1), max(width, 1)


def longest_edge_size(height, width, longest_edge) -> Tuple[int, int]:
    """Output size of the first resize for a ``{'longest_edge': ...}`` size."""
    height, width = rescale_to_longest_edge(height, width, longest_edge)
    return scale_below_upper_bound(height, width)


def vision_encoder_size(height, width, tile) -> Tuple[int, int]:
    """Round both sides up to tile multiples (``resize_for_vision_encoder`` arithmetic)."""
    aspect_ratio = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = int(width / aspect_ratio)
        height = math.ceil(height / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = int(height * aspect_ratio)
        width = math.ceil(width / tile) * tile
    return height, width


def split_grid(height, width, tile) -> Tuple[int, int]:
    """Tile rows and columns of an encoder-sized image; (0, 0) when it is a single frame."""
    if height > tile or width > tile:
        return (height - tile) // tile + 1, (width - tile) // tile + 1
    return 0, 0


def image_prompt(rows, cols, image_seq_len, fake_token=FAKE_IMAGE_TOKEN,
                 image_token=IMAGE_TOKEN, global_token=GLOBAL_IMAGE_TOKEN) -> str:
    """Return the processor's expansion of one ``<image>`` for a ``rows`` x ``cols`` grid."""
    tokens = image_token * image_seq_len
    global_view = f'{fake_token}{global_token}{tokens}{fake_token}'
    if rows == 0 and cols == 0:
        return global_view
    text = ''
    for r in range(rows):
        for c in range(cols):
            text += f'{fake_token}<row_{r + 1}_col_{c + 1}>{tokens}'
        text += '\n'
    return f'{text}\n{global_view}'


@dataclass
class ImagePlan:
    """How one image is processed: resize sizes and tile grid."""

    resized: Tuple[int, int]
    """(height, width) after the first resize."""
    encoder: Optional[Tuple[int, int]]
    """(height, width) after the vision-encoder resize; None without splitting."""
    rows: int
    cols: int
    longest_edge: Optional[int]
    """The longest edge used (lowered by ``max_tiles``); None for a fixed-size resize."""

    @property
    def num_frames(self):
        """Tiles plus the global view, or 1 for a single frame."""
        return self.rows * self.cols + 1 if self.rows or self.cols else 1


def _size_entry(value, name, source):
    if isinstance(value, int) and not isinstance(value, bool):
        return {'longest_edge': value}
    if not isinstance(value, dict):
        raise ModelFilesError(f'{source}: {name} must be a dict, got {value!r}')
    return value


class Idefics3Family(TemplatedFamily):
    """SmolVLM / SmolVLM2 / Idefics3: every constant from the model directory's files."""

    info = FamilyInfo(
        key='smolvlm', model_type_param=1, display_name='SmolVLM/SmolVLM2',
        config_model_types=MODEL_TYPES, mmproj_projectors=('idefics3',),
        fallback_chat_template=(
            "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
            "{{ ':' if message['content'][0]['type'] == 'image' else ': ' }}"
            "{% for part in message['content'] %}{% if part['type'] == 'text' %}"
            "{{ part['text'] }}{% else %}<image>{% endif %}{% endfor %}<end_of_utterance>\n"
            '{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}'),
        default=True,
        # SmolVLM itself was not trained to locate objects; the embedded default model (this
        # family) answers InternVL's grounding question in InternVL's format.
        box_format=grounding.NORMALIZED_1000, grounding_prompt=grounding.INTERNVL_PROMPT)
    frame_axis = 1  # pixel_values [1, frames, 3, H, W]

    def __init__(self, model_dir):
        self.model_dir = model_dir
        config, text, self.context_length, self.text_hidden_size = read_config(
            model_dir, MODEL_TYPES)
        self.vision_heads, self.vision_hidden_size = vision_shape(config)
        self.name = config['model_type']
        self._read_preprocessor(model_dir)
        self.tokenizer = Tokenizer(model_dir)
        self._read_tokens(model_dir, config)
        self.image_seq_len = self._read_image_seq_len(model_dir, config)
        self.eos_token_ids = read_eos_ids(model_dir, config, text, self.tokenizer)
        self.read_chat_template(model_dir, self.image_token)

    def _read_preprocessor(self, model_dir):
        source = f'{model_dir}/preprocessor_config.json'
        cfg = {**DEFAULTS, **load_json(model_dir, 'preprocessor_config.json')}
        self.do_resize = bool(cfg['do_resize'])
        self.size = _size_entry(cfg['size'], 'size', source)
        if not (self.size.get('longest_edge') or (self.size.get('height') and
                                                  self.size.get('width'))):
            raise ModelFilesError(f"{source}: size needs 'longest_edge' or 'height' and "
                                  f"'width', got {self.size}")
        self.longest_edge = self.size.get('longest_edge')
        max_image_size = _size_entry(cfg['max_image_size'], 'max_image_size', source)
        if not max_image_size.get('longest_edge'):
            raise ModelFilesError(f"{source}: max_image_size needs 'longest_edge'")
        self.tile_size = int(max_image_size['longest_edge'])
        self.do_image_splitting = bool(cfg['do_image_splitting'])
        self.read_pixel_settings(cfg, source)

    def _read_tokens(self, model_dir, config):
        tok = self.tokenizer
        if self.name == 'smolvlm':
            # SmolVLMProcessor reads the strings from the tokenizer; Idefics3Processor hardcodes.
            self.fake_image_token = tok.config_token('fake_image_token', FAKE_IMAGE_TOKEN)
            self.image_token = tok.config_token('image_token', IMAGE_TOKEN)
            self.global_image_token = tok.config_token('global_image_token', GLOBAL_IMAGE_TOKEN)
        else:
            self.fake_image_token, self.image_token = FAKE_IMAGE_TOKEN, IMAGE_TOKEN
            self.global_image_token = GLOBAL_IMAGE_TOKEN
        self.fake_image_token_id, self.image_token_id, self.global_image_token_id = \
            self.special_token_ids(model_dir, (self.fake_image_token, self.image_token,
                                               self.global_image_token))
        self.check_config_token_id(model_dir, 'image_token_id', config.get('image_token_id'),
                                   self.image_token, self.image_token_id)

    def _read_image_seq_len(self, model_dir, config):
        vision = config.get('vision_config') or {}
        computed = None
        try:
            computed = int(((int(vision['image_size']) // int(vision['patch_size'])) ** 2) /
                           (int(config.get('scale_factor', 2)) ** 2))
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            pass
        given = load_json(model_dir, 'processor_config.json', required=False).get(
            'image_seq_len')
        if given is None:
            if computed is None:
                raise ModelFilesError(
                    f'{model_dir}: no image_seq_len in processor_config.json and config.json '
                    'lacks vision_config.image_size / patch_size to compute it')
            return computed
        if computed is not None and int(given) != computed:
            raise ModelMismatchError(
                f'{model_dir}: processor_config.json image_seq_len {given} does not match the '
                f'vision encoder ((image_size // patch_size)**2 / scale_factor**2 = {computed})')
        return int(given)

    # Image side.

    def plan(self, height, width, image_options: Optional[ImageOptions] = None) -> ImagePlan:
        """Sizes and tile grid for a ``height`` x ``width`` image under ``image_options``."""
        options = image_options or ImageOptions()
        if options.max_tiles < 0:
            raise ImageError(f'max_tiles must be >= 0 (0 = no cap), got {options.max_tiles}')
        split = self.do_image_splitting if options.do_image_splitting is None else \
            bool(options.do_image_splitting)
        plan = self._plan(height, width, split, self.longest_edge if self.do_resize else None)
        if split and options.max_tiles and plan.rows * plan.cols > options.max_tiles:
            top = plan.longest_edge or max(plan.resized)
            for n in range(math.ceil(top / self.tile_size) - 1, 0, -1):
                plan = self._plan(height, width, split, n * self.tile_size)
                if plan.rows * plan.cols <= options.max_tiles:
                    break
        return plan

    def _plan(self, height, width, split, longest_edge):
        if longest_edge:
            resized = longest_edge_size(height, width, longest_edge)
        elif self.do_resize:
            resized = (int(self.size['height']), int(self.size['width']))
        else:
            resized = (height, width)
        if not split:
            return ImagePlan(resized, None, 0, 0, longest_edge)
        encoder = vision_encoder_size(resized[0], resized[1], self.tile_size)
        rows, cols = split_grid(encoder[0], encoder[1], self.tile_size)
        return ImagePlan(resized, encoder, rows, cols, longest_edge)

    def preprocess(self, image, image_options: Optional[ImageOptions] = None
                   ) -> Tuple[Dict[str, np.ndarray], ImagePlan]:
        """
        Return the vision inputs and the plan for one image.

        ``pixel_values`` float32 [1, frames, 3, H, W] and ``pixel_attention_mask`` bool
        [1, frames, H, W], frames in the processor's order (tiles row-major, global last).
        """
        rgb = images.to_rgb(image)
        height, width = rgb.shape[:2]
        plan = self.plan(height, width, image_options)
        resample, tile = self.resample, self.tile_size
        img = rgb
        if self.do_resize or plan.longest_edge:
            img = images.resize(img, plan.resized[0], plan.resized[1], resample)
        if plan.encoder is None:
            frames = [images.resize(img, tile, tile, resample)]
        else:
            img = images.resize(img, plan.encoder[0], plan.encoder[1], resample)
            if plan.rows or plan.cols:
                frames = [img[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile]
                          for r in range(plan.rows) for c in range(plan.cols)]
                frames.append(images.resize(img, tile, tile, resample))
            else:
                frames = [img]
        max_h = max(f.shape[0] for f in frames)
        max_w = max(f.shape[1] for f in frames)
        pixels = np.zeros((1, len(frames), 3, max_h, max_w), dtype=np.float32)
        mask = np.zeros((1, len(frames), max_h, max_w), dtype=bool)
        images.apply_tables_to_frames(frames, self._tables, pixels[0])
        for i, frame in enumerate(frames):
            mask[0, i, :frame.shape[0], :frame.shape[1]] = True
        return {'pixel_values': pixels, 'pixel_attention_mask': mask}, plan

    # Text side.

    def image_prompt(self, rows, cols) -> str:
        """Return the text one image expands to for a ``rows`` x ``cols`` grid."""
        return image_prompt(rows, cols, self.image_seq_len, self.fake_image_token,
                            self.image_token, self.global_image_token)

    def render(self, prompt, system_prompt='', num_images=0, turns=()) -> str:
        """Render the chat-template prompt, user text marked, ``<image>`` not yet expanded."""
        messages = self.messages(prompt, system_prompt, num_images, turns)
        return self.chat_template.render(messages, add_generation_prompt=True)

    def expand_image(self, plan) -> str:
        """Return the text one image of this ``plan`` expands to."""
        return self.image_prompt(plan.rows, plan.cols)

    def image_tokens_for(self, plan) -> int:
        """Return ``image_seq_len`` tokens per frame (tiles plus the global image)."""
        return plan.num_frames * self.image_seq_len
