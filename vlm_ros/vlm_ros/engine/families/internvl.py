r"""
InternVL2.5 and InternVL3: dynamic tiling and prompt layout, exact to the reference code.

Two layouts of the same models are read:

* transformers' (``model_type`` ``internvl``, e.g. OpenGVLab/InternVL3-1B-hf): the
  ``GotOcr2ImageProcessor`` with ``crop_to_patches`` (which ``InternVLProcessor`` always
  turns on), ``preprocessor_config.json`` for the tile size, filter, mean / std and
  ``min_patches`` / ``max_patches``, ``processor_config.json`` for ``image_seq_length``,
  the image tokens from ``tokenizer_config.json``;
* the original remote-code one (``model_type`` ``internvl_chat``, e.g.
  OpenGVLab/InternVL2_5-1B): ``force_image_size``, ``downsample_ratio``,
  ``min_dynamic_patch`` / ``max_dynamic_patch``, ``use_thumbnail`` and
  ``dynamic_image_size`` from ``config.json``, ImageNet mean / std, and ``model.chat``'s
  prompt (``<image>\n`` before the question).

The tiling is InternVL's ``dynamic_preprocess`` (equal to transformers'
``crop_image_to_patches``): among the ``cols`` x ``rows`` grids with ``min_num`` <=
``cols * rows`` <= ``max_num``, ordered by tile count, the one whose aspect ratio is
closest to the image's wins; on a tie the later (larger) grid wins while the image's area
exceeds half of that grid's pixel area. The image is resized to the grid (Pillow, on uint8
RGB, with the configured filter: bicubic), cut into tiles row by row, and, when there is
more than one tile, the whole image resized to one tile is appended as a thumbnail. Pixels
are rescaled and normalised as transformers does (float64 multiply, float32
``(x - mean) / std``).

The image becomes ``<img>`` + ``<IMG_CONTEXT>`` x (tokens per tile x tiles) + ``</img>``,
where tokens per tile = (tile / patch)**2 * downsample_ratio**2 (256 for the real models),
in place of the placeholder the chat template writes for the image (the image comes before
the text in the user turn, as in the model cards).

``ImageOptions``: ``do_image_splitting=False`` gives one tile (no thumbnail);
``max_tiles`` lowers ``max_num`` (the thumbnail is not counted). Special-token strings in
user text are encoded as plain text, as transformers does with
``sanitize_control_tokens=True``.
"""

from dataclasses import dataclass
import functools
from typing import Dict, Optional, Tuple

import numpy as np

from vlm_ros.engine import grounding, images
from vlm_ros.engine.chat_template import mark_control_tokens
from vlm_ros.engine.datatypes import ImageOptions
from vlm_ros.engine.errors import (ImageError, ModelFilesError, ModelMismatchError,
                                   UnsupportedModelError)
from vlm_ros.engine.families.base import (FamilyInfo, read_config, read_eos_ids,
                                          TemplatedFamily, vision_shape)
from vlm_ros.engine.model_files import load_json
from vlm_ros.engine.tokenizer import Tokenizer

HF_MODEL_TYPE = 'internvl'
CHAT_MODEL_TYPE = 'internvl_chat'
MODEL_TYPES = (HF_MODEL_TYPE, CHAT_MODEL_TYPE)

START_IMAGE_TOKEN = '<img>'
END_IMAGE_TOKEN = '</img>'
CONTEXT_IMAGE_TOKEN = '<IMG_CONTEXT>'
# The remote code's question prefix, replaced by the image tokens after rendering.
CHAT_IMAGE_PLACEHOLDER = '<image>'

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
BICUBIC = 3
# GotOcr2ImageProcessor class defaults, used when preprocessor_config.json omits a key
# (mean / std are CLIP's there; the InternVL files always give ImageNet's).
HF_DEFAULTS = {
    'do_resize': True, 'size': {'height': 384, 'width': 384}, 'resample': BICUBIC,
    'do_rescale': True, 'rescale_factor': 1.0 / 255.0, 'do_normalize': True,
    'image_mean': [0.48145466, 0.4578275, 0.40821073],
    'image_std': [0.26862954, 0.26130258, 0.27577711],
    'min_patches': 1, 'max_patches': 12,
}
# InternVLProcessor's default when processor_config.json has no image_seq_length.
HF_IMAGE_SEQ_LENGTH = 256
# The remote code's dynamic_preprocess defaults (model card: max_num=12).
CHAT_DEFAULTS = {'min_dynamic_patch': 1, 'max_dynamic_patch': 12, 'use_thumbnail': True,
                 'dynamic_image_size': True, 'downsample_ratio': 0.5}
# A private-use character standing in for the image while the chat template renders.
_IMAGE_SENTINEL = '\U000f0002'


@functools.lru_cache(maxsize=32)
def tile_grids(min_num: int, max_num: int) -> Tuple[Tuple[int, int], ...]:
    """(cols, rows) grids with ``min_num <= cols * rows <= max_num``, by tile count."""
    grids = [(cols, rows) for cols in range(1, max_num + 1) for rows in range(1, max_num + 1)
             if min_num <= cols * rows <= max_num]
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def best_grid(height: int, width: int, tile: int, min_num: int, max_num: int
              ) -> Tuple[int, int]:
    """
    Return (cols, rows): InternVL's ``find_closest_aspect_ratio``.

    Closest aspect ratio first; on an exact tie the larger grid wins while the image's area
    exceeds half of its pixel area (no needless upscaling of small images).
    """
    aspect_ratio = width / height
    area = width * height
    best_diff = float('inf')
    best = (1, 1)
    for cols, rows in tile_grids(min_num, max_num):
        diff = abs(aspect_ratio - cols / rows)
        if diff < best_diff:
            best_diff = diff
            best = (cols, rows)
        elif diff == best_diff and area > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    return best


@dataclass
class TilePlan:
    """How one image is cut: grid and thumbnail."""

    cols: int
    rows: int
    thumbnail: bool

    @property
    def num_tiles(self):
        """Grid tiles plus the thumbnail."""
        return self.cols * self.rows + int(self.thumbnail)


def _side(value, name, source) -> int:
    """Return an image or patch size given as an int or a square [h, w] pair."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise UnsupportedModelError(f'{source}: {name} must be a positive int or a square '
                                    f'[h, w] pair, got {value!r}')
    return value


class InternVLFamily(TemplatedFamily):
    """InternVL2.5 / InternVL3 in transformers' or the original layout, from their files."""

    vision_input_names = ('pixel_values',)

    info = FamilyInfo(
        key='internvl', model_type_param=0, display_name='InternVL2.5/3',
        config_model_types=MODEL_TYPES, mmproj_projectors=('internvl',),
        fallback_chat_template=(
            "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
            "{% for part in message['content'] %}{% if part['type'] == 'text' %}"
            "{{ part['text'] }}{% else %}<image>\n{% endif %}{% endfor %}<|im_end|>\n"
            '{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}'),
        box_format=grounding.NORMALIZED_1000, grounding_prompt=grounding.INTERNVL_PROMPT)

    def __init__(self, model_dir):
        self.model_dir = model_dir
        config, text, self.context_length, self.text_hidden_size = read_config(
            model_dir, MODEL_TYPES)
        self.vision_heads, self.vision_hidden_size = vision_shape(config)
        self.name = config['model_type']
        self.tokenizer = Tokenizer(model_dir)
        if self.name == HF_MODEL_TYPE:
            self._read_hf(model_dir, config)
        else:
            self._read_chat(model_dir, config)
        self._read_tokens(model_dir, config)
        # model.chat stops at the conversation separator, the tokenizer's <|im_end|>.
        self.eos_token_ids = read_eos_ids(model_dir, config, text, self.tokenizer,
                                          with_tokenizer_eos=self.name == CHAT_MODEL_TYPE)
        self.read_chat_template(model_dir, self.template_image_token)

    # Model files.

    def _vision_geometry(self, config, tile):
        """Tokens per tile from config.json: (tile / patch)**2 * downsample_ratio**2."""
        source = f'{self.model_dir}/config.json'
        vision = config.get('vision_config') or {}
        if 'patch_size' not in vision:
            raise ModelFilesError(f'{source} lacks vision_config.patch_size')
        patch = _side(vision['patch_size'], 'vision_config.patch_size', source)
        ratio = float(config.get('downsample_ratio', CHAT_DEFAULTS['downsample_ratio']))
        side = tile // patch
        if tile % patch or side * ratio != int(side * ratio) or ratio <= 0:
            raise UnsupportedModelError(
                f'{source}: tile {tile} / patch {patch} = {tile / patch} patches per side do '
                f'not pixel-shuffle evenly with downsample_ratio {ratio}')
        return int(side * side * ratio * ratio)

    def _read_hf(self, model_dir, config):
        source = f'{model_dir}/preprocessor_config.json'
        cfg = {**HF_DEFAULTS, **load_json(model_dir, 'preprocessor_config.json')}
        size = cfg['size']
        if not isinstance(size, dict) or not size.get('height') or not size.get('width'):
            raise UnsupportedModelError(f"{source}: size needs 'height' and 'width', got "
                                        f'{size!r}')
        if int(size['height']) != int(size['width']):
            raise UnsupportedModelError(f'{source}: only square tiles are supported, got '
                                        f'{size}')
        self.tile_size = int(size['height'])
        if not cfg['do_resize']:
            raise UnsupportedModelError(f'{source}: do_resize false is not supported (the '
                                        'vision encoder takes tiles of one size)')
        self.read_pixel_settings(cfg, source)
        self.min_num = int(cfg['min_patches'])
        self.max_num = int(cfg['max_patches'])
        # InternVLProcessor passes crop_to_patches=True whatever the image processor says.
        self.do_image_splitting = True
        self.use_thumbnail = True
        vision = config.get('vision_config') or {}
        encoder_tile = _side(vision.get('image_size', self.tile_size),
                             'vision_config.image_size', f'{model_dir}/config.json')
        if encoder_tile != self.tile_size:
            raise ModelMismatchError(
                f'{model_dir}: preprocessor_config.json makes {self.tile_size}-pixel tiles '
                f'but the vision encoder takes {encoder_tile}')
        computed = self._vision_geometry(config, self.tile_size)
        proc = load_json(model_dir, 'processor_config.json', required=False)
        given = proc.get('image_seq_length')
        if given is None:
            given = HF_IMAGE_SEQ_LENGTH if 'image_seq_length' not in config else \
                config['image_seq_length']
        if int(given) != computed:
            raise ModelMismatchError(
                f'{model_dir}: image_seq_length {given} does not match the vision encoder '
                f'((image_size / patch_size)**2 * downsample_ratio**2 = {computed})')
        self.image_seq_length = computed

    def _read_chat(self, model_dir, config):
        source = f'{model_dir}/config.json'
        vision = config.get('vision_config') or {}
        tile = config.get('force_image_size') or vision.get('image_size')
        if tile is None:
            raise ModelFilesError(f'{source} lacks force_image_size and '
                                  'vision_config.image_size')
        self.tile_size = _side(tile, 'force_image_size', source)
        # The remote code normalises with ImageNet constants; a CLIP-style
        # preprocessor_config.json, when shipped, says the same and may name the filter.
        cfg = {'do_rescale': True, 'rescale_factor': 1.0 / 255.0, 'do_normalize': True,
               'image_mean': IMAGENET_MEAN, 'image_std': IMAGENET_STD, 'resample': BICUBIC}
        pre = load_json(model_dir, 'preprocessor_config.json', required=False)
        cfg.update({k: pre[k] for k in ('image_mean', 'image_std', 'resample') if k in pre})
        self.read_pixel_settings(cfg, f'{model_dir}/preprocessor_config.json')
        merged = {**CHAT_DEFAULTS, **config}
        self.min_num = int(merged['min_dynamic_patch'])
        self.max_num = int(merged['max_dynamic_patch'])
        self.use_thumbnail = bool(merged['use_thumbnail'])
        self.do_image_splitting = bool(merged['dynamic_image_size'])
        self.image_seq_length = self._vision_geometry(config, self.tile_size)

    def _read_tokens(self, model_dir, config):
        tok = self.tokenizer
        if self.name == HF_MODEL_TYPE:
            # InternVLProcessor reads the strings from the tokenizer.
            self.start_image_token = tok.config_token('start_image_token', START_IMAGE_TOKEN)
            self.end_image_token = tok.config_token('end_image_token', END_IMAGE_TOKEN)
            self.image_token = tok.config_token('context_image_token', CONTEXT_IMAGE_TOKEN)
            self.template_image_token = self.image_token
        else:
            # The remote code hardcodes them (IMG_START_TOKEN, IMG_END_TOKEN,
            # IMG_CONTEXT_TOKEN).
            self.start_image_token, self.end_image_token = START_IMAGE_TOKEN, END_IMAGE_TOKEN
            self.image_token = CONTEXT_IMAGE_TOKEN
            self.template_image_token = _IMAGE_SENTINEL
        self.placeholder_label = (CHAT_IMAGE_PLACEHOLDER if self.name == CHAT_MODEL_TYPE
                                  else self.template_image_token)
        self.start_image_token_id, self.end_image_token_id, self.image_token_id = \
            self.special_token_ids(model_dir, (self.start_image_token, self.end_image_token,
                                               self.image_token))
        self.check_config_token_id(
            model_dir, 'image_token_id',
            config.get('image_token_id', config.get('img_context_token_id')),
            self.image_token, self.image_token_id)

    # Image side.

    def plan(self, height, width, image_options: Optional[ImageOptions] = None) -> TilePlan:
        """Grid and thumbnail for a ``height`` x ``width`` image under ``image_options``."""
        options = image_options or ImageOptions()
        if options.max_tiles < 0:
            raise ImageError(f'max_tiles must be >= 0 (0 = no cap), got {options.max_tiles}')
        split = self.do_image_splitting if options.do_image_splitting is None else \
            bool(options.do_image_splitting)
        max_num = self.max_num
        if options.max_tiles:
            max_num = min(max_num, options.max_tiles)
        if not split or max_num <= 1:
            return TilePlan(1, 1, False)
        min_num = min(self.min_num, max_num)
        cols, rows = best_grid(height, width, self.tile_size, min_num, max_num)
        return TilePlan(cols, rows, self.use_thumbnail and cols * rows != 1)

    def preprocess(self, image, image_options: Optional[ImageOptions] = None
                   ) -> Tuple[Dict[str, np.ndarray], TilePlan]:
        """
        Return the vision inputs and the plan for one image.

        ``pixel_values`` float32 [tiles, 3, tile, tile], tiles row-major, thumbnail last.
        """
        rgb = images.to_rgb(image)
        height, width = rgb.shape[:2]
        plan = self.plan(height, width, image_options)
        tile, resample = self.tile_size, self.resample
        grid = images.resize(rgb, plan.rows * tile, plan.cols * tile, resample)
        frames = [grid[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile]
                  for r in range(plan.rows) for c in range(plan.cols)]
        if plan.thumbnail:
            frames.append(images.resize(rgb, tile, tile, resample))
        pixels = np.empty((len(frames), 3, tile, tile), dtype=np.float32)
        images.apply_tables_to_frames(frames, self._tables, pixels)
        return {'pixel_values': pixels}, plan

    # Text side.

    def image_prompt(self, num_tiles) -> str:
        """Return the text one image of ``num_tiles`` tiles expands to."""
        return (self.start_image_token + self.image_token * (self.image_seq_length * num_tiles)
                + self.end_image_token)

    def render(self, prompt, system_prompt='', num_images=0, turns=()) -> str:
        """Render the chat-template prompt: user text marked, the images not yet expanded."""
        if self.name == HF_MODEL_TYPE:
            messages = self.messages(prompt, system_prompt, num_images, turns)
            return self.chat_template.render(messages, add_generation_prompt=True)
        # The remote code's chat(): string contents, '<image>\n' before the question; several
        # images numbered one per line ('Image-1: <image>\n'), as its multi-image examples.
        turns = [(t, 0) if isinstance(t, str) else t for t in turns]
        turns = [(text.replace(_IMAGE_SENTINEL, ''), n) for text, n in turns]
        turns.append((prompt.replace(_IMAGE_SENTINEL, ''), num_images))
        messages = []
        if system_prompt:
            messages.append({'role': 'system',
                             'content': system_prompt.replace(_IMAGE_SENTINEL, '')})
        for i, (text, _) in enumerate(turns):
            messages.append({'role': 'user' if i % 2 == 0 else 'assistant', 'content': text})
        messages = mark_control_tokens(messages, self._control)
        for message, (_, count) in zip(messages[-len(turns):], turns, strict=True):
            if count == 1:
                message['content'] = f'{_IMAGE_SENTINEL}\n' + message['content']
            elif count > 1:
                message['content'] = ''.join(
                    f'Image-{i}: {_IMAGE_SENTINEL}\n' for i in range(1, count + 1)) + \
                    message['content']
        return self.chat_template.render(messages, add_generation_prompt=True)

    def expand_image(self, plan) -> str:
        """Return the text one image of this ``plan`` expands to."""
        return self.image_prompt(plan.num_tiles)

    def image_tokens_for(self, plan) -> int:
        """Return ``image_seq_length`` tokens per tile (thumbnail included)."""
        return plan.num_tiles * self.image_seq_length
