"""
Build tiny random-weight SmolVLM checkpoints laid out like the Hugging Face hub repos.

``build_tiny_smolvlm(out_dir, variant, seed)`` writes the same file set as
HuggingFaceTB/SmolVLM2-256M-Video-Instruct (config.json, generation_config.json,
preprocessor_config.json, processor_config.json, chat_template.json, tokenizer.json,
tokenizer_config.json, special_tokens_map.json, model.safetensors) for a model of a few
hundred kilobytes.  Nothing is downloaded.  Weights are drawn with a larger standard
deviation than a real initialisation so that the logits of the random model are well
separated and greedy decoding is a meaningful parity check (``hub_files.reinit_weights``).
"""

import os

from . import hub_files, tiny_tokenizer
# The benchmarks import quiet_transformers from here.
from .hub_files import quiet_transformers  # noqa: F401

# Tiny shapes.  image_seq_len = (tile / patch)**2 / scale_factor**2 and the preprocessor
# resizes the longest edge to 4 tiles, like the real 2048 / 512.
VARIANTS = {
    'a': {
        'vision': {'hidden_size': 64, 'intermediate_size': 128, 'num_hidden_layers': 2,
                   'num_attention_heads': 4, 'image_size': 64, 'patch_size': 8},
        'text': {'hidden_size': 64, 'intermediate_size': 128, 'num_hidden_layers': 2,
                 'num_attention_heads': 4, 'num_key_value_heads': 2, 'head_dim': 16,
                 'rope_theta': 100000.0},
        'scale_factor': 2,
        'tie_word_embeddings': True,
        'tiles_per_edge': 4,
    },
    'b': {
        'vision': {'hidden_size': 48, 'intermediate_size': 96, 'num_hidden_layers': 2,
                   'num_attention_heads': 3, 'image_size': 96, 'patch_size': 8},
        'text': {'hidden_size': 128, 'intermediate_size': 256, 'num_hidden_layers': 3,
                 'num_attention_heads': 8, 'num_key_value_heads': 8, 'head_dim': 16,
                 'rope_theta': 10000.0},
        'scale_factor': 4,
        'tie_word_embeddings': False,
        'tiles_per_edge': 4,
    },
}


def variant_spec(variant):
    """Return the shape dictionary of ``variant`` (raises ``KeyError`` if unknown)."""
    if variant not in VARIANTS:
        known = ', '.join(sorted(VARIANTS))
        raise KeyError(f'unknown tiny SmolVLM variant {variant!r} (known: {known})')
    return VARIANTS[variant]


def image_seq_len(variant):
    """Return the number of ``<image>`` tokens per tile for ``variant``."""
    spec = variant_spec(variant)
    side = spec['vision']['image_size'] // spec['vision']['patch_size']
    return (side * side) // (spec['scale_factor'] ** 2)


def make_config(variant, ids):
    """Return a ``SmolVLMConfig`` for ``variant`` given the tokenizer's special ids."""
    spec = variant_spec(variant)
    vision = spec['vision']
    side = vision['image_size'] // vision['patch_size']
    if side % spec['scale_factor']:
        raise ValueError('patches per side must be divisible by scale_factor')
    return config_from_spec(spec, ids)


def config_from_spec(spec, ids):
    """Return a ``SmolVLMConfig`` with ``spec``'s shapes and the tokenizer's special ids."""
    from transformers import SmolVLMConfig

    text = dict(spec['text'])
    rope_theta = text.pop('rope_theta')
    text.update({
        'model_type': 'llama',
        'vocab_size': ids['vocab_size'],
        'max_position_embeddings': 8192,
        'rms_norm_eps': 1e-5,
        'rope_parameters': {'rope_type': 'default', 'rope_theta': rope_theta},
        'pad_token_id': ids['pad_token_id'],
        'bos_token_id': ids['bos_token_id'],
        'eos_token_id': ids['eos_token_id'],
        'tie_word_embeddings': spec['tie_word_embeddings'],
    })
    return SmolVLMConfig(
        vision_config=dict(spec['vision']),
        text_config=text,
        scale_factor=spec['scale_factor'],
        image_token_id=ids['image_token_id'],
        tie_word_embeddings=spec['tie_word_embeddings'],
        pad_token_id=ids['pad_token_id'],
        use_cache=True,
    )


def preprocessor_config(variant):
    """Return the hub-style ``preprocessor_config.json`` dict."""
    spec = variant_spec(variant)
    tile = spec['vision']['image_size']
    return image_processor_config(tile, spec['tiles_per_edge'], do_image_splitting=True)


def image_processor_config(tile, tiles_per_edge, do_image_splitting):
    """Return a SmolVLM ``preprocessor_config.json`` dict for ``tile``-sized tiles."""
    return {
        'do_convert_rgb': True,
        'do_image_splitting': do_image_splitting,
        'do_normalize': True,
        'do_pad': True,
        'do_rescale': True,
        'do_resize': True,
        'image_mean': [0.5, 0.5, 0.5],
        'image_processor_type': 'SmolVLMImageProcessor',
        'image_std': [0.5, 0.5, 0.5],
        'max_image_size': {'longest_edge': tile},
        'processor_class': 'SmolVLMProcessor',
        'resample': 1,
        'rescale_factor': 1.0 / 255.0,
        'size': {'longest_edge': tiles_per_edge * tile},
        'video_sampling': {'fps': 1, 'max_frames': 64, 'video_size': {'longest_edge': tile}},
    }


def _hub_config_keys(cfg, tiles_per_edge):
    """Add the keys SmolVLM hub configs carry (legacy names included) to ``config.json``."""
    if '_pad_token_id' in cfg:
        cfg['pad_token_id'] = cfg.pop('_pad_token_id')
    vision = cfg['vision_config']
    tile = vision['image_size']
    vision['max_image_size'] = {'longest_edge': tile}
    vision['size'] = {'longest_edge': tiles_per_edge * tile}
    cfg['vocab_size'] = cfg['text_config']['vocab_size']


def save_checkpoint(model, ids, out_dir, preprocessor, image_seq_len, tiles_per_edge):
    """
    Save a SmolVLM and every config file of the hub layout into ``out_dir``.

    ``ids`` are the tokenizer's special ids (``tiny_tokenizer.token_ids``), ``preprocessor``
    the ``preprocessor_config.json`` dict, ``image_seq_len`` the image tokens per tile and
    ``tiles_per_edge`` how many tiles the longest edge is resized to.
    """
    hub_files.save_checkpoint(
        model, out_dir,
        generation={'bos_token_id': ids['bos_token_id'],
                    'eos_token_id': [ids['im_end_token_id'], ids['eos_token_id']],
                    'pad_token_id': ids['pad_token_id']},
        preprocessor=preprocessor,
        processor={'image_seq_len': image_seq_len, 'processor_class': 'SmolVLMProcessor'},
        edit_config=lambda cfg: _hub_config_keys(cfg, tiles_per_edge))


def build_tiny_smolvlm(out_dir, variant='a', seed=0):
    """Write a tiny random-weight SmolVLM checkpoint into ``out_dir`` and return its path."""
    from transformers import SmolVLMForConditionalGeneration

    spec = variant_spec(variant)
    os.makedirs(out_dir, exist_ok=True)
    ids = tiny_tokenizer.write_tiny_tokenizer(out_dir)
    model = hub_files.random_model(SmolVLMForConditionalGeneration, make_config(variant, ids),
                                   seed)
    save_checkpoint(model, ids, out_dir, preprocessor_config(variant), image_seq_len(variant),
                    spec['tiles_per_edge'])
    return out_dir


def ensure_processor_importable():
    """
    Make ``SmolVLMProcessor`` constructible when the optional ``num2words`` is missing.

    transformers refuses to build the SmolVLM processor without ``num2words``, which it
    only uses to spell out video frame counts.  When the package is absent a minimal
    stand-in is installed in the processor module (images never reach it).
    """
    from transformers.models.smolvlm import processing_smolvlm

    if processing_smolvlm.num2words is None:
        processing_smolvlm.num2words = _num2words_fallback


def _num2words_fallback(number):
    """Spell ``number`` with digits (stand-in for ``num2words.num2words``)."""
    return str(number)


def load_processor(model_dir):
    """
    Load the transformers ``SmolVLMProcessor`` of a saved model directory (no network).

    ``AutoProcessor`` first; without torchvision it is assembled from the same files by hand
    (``hub_files.load_processor``).
    """
    ensure_processor_importable()
    return hub_files.load_processor(model_dir, 'SmolVLMProcessor', 'image_seq_len')
