"""
Build tiny random-weight Qwen2-VL and Qwen2.5-VL checkpoints in the hub repos' file layout.

``build_tiny_qwen2vl(out_dir, variant, seed)`` writes the file set of
Qwen/Qwen2-VL-2B-Instruct or Qwen/Qwen2.5-VL-3B-Instruct (config.json,
generation_config.json, preprocessor_config.json, chat_template.json, tokenizer.json,
tokenizer_config.json, special_tokens_map.json, model.safetensors) for a
``Qwen2VLForConditionalGeneration`` / ``Qwen2_5_VLForConditionalGeneration`` of a few hundred
kilobytes.  Nothing is downloaded.

The tokenizer is the small Qwen2-style byte-level BPE of the InternVL factory with Qwen2-VL's
added tokens in their order.  Patches stay 14 pixels and merges 2x2, as in the real models,
but ``max_pixels`` is small, so an image costs at most ``MAX_MERGED`` tokens.

Variants (two shapes per family): ``qwen2-a`` / ``qwen2-b`` are Qwen2-VL, ``qwen25-a`` /
``qwen25-b`` Qwen2.5-VL with different depths, head counts and full-attention blocks (both
with the published 112-pixel attention windows, which libmtmd assumes).
"""

import json
import os

from . import hub_files, internvl_factory, model_cache, tiny_tokenizer

ENDOFTEXT_TOKEN = '<|endoftext|>'
IM_START_TOKEN = '<|im_start|>'
IM_END_TOKEN = '<|im_end|>'
VISION_START_TOKEN = '<|vision_start|>'
VISION_END_TOKEN = '<|vision_end|>'
IMAGE_PAD_TOKEN = '<|image_pad|>'
VIDEO_PAD_TOKEN = '<|video_pad|>'
# Qwen2-VL's added tokens, in their order (ids 151643... in the real vocabulary).
ADDED_TOKENS = [ENDOFTEXT_TOKEN, IM_START_TOKEN, IM_END_TOKEN, '<|object_ref_start|>',
                '<|object_ref_end|>', '<|box_start|>', '<|box_end|>', '<|quad_start|>',
                '<|quad_end|>', VISION_START_TOKEN, VISION_END_TOKEN, '<|vision_pad|>',
                IMAGE_PAD_TOKEN, VIDEO_PAD_TOKEN]
SPECIAL_TOKENS = [IM_START_TOKEN, IM_END_TOKEN, '<|object_ref_start|>', '<|object_ref_end|>',
                  '<|box_start|>', '<|box_end|>', '<|quad_start|>', '<|quad_end|>',
                  VISION_START_TOKEN, VISION_END_TOKEN, '<|vision_pad|>', IMAGE_PAD_TOKEN,
                  VIDEO_PAD_TOKEN]

# The chat template the Qwen2-VL and Qwen2.5-VL instruct repos ship (chat_template.json):
# a default system turn, one vision block per image.
CHAT_TEMPLATE = (
    '{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}'
    '{% for message in messages %}'
    "{% if loop.first and message['role'] != 'system' %}"
    '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}'
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    '{% set image_count.value = image_count.value + 1 %}'
    '{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}'
    '<|vision_start|><|image_pad|><|vision_end|>'
    "{% elif content['type'] == 'video' or 'video' in content %}"
    '{% set video_count.value = video_count.value + 1 %}'
    '{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}'
    '<|vision_start|><|video_pad|><|vision_end|>'
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    '{% endif %}{% endfor %}'
    '{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}'
)

PATCH_SIZE = 14
MERGE_SIZE = 2
MAX_MERGED = 48
"""Most merged tokens per image (``max_pixels`` = this many 28x28 squares)."""
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

VARIANTS = {
    'qwen2-a': {
        'family': 'qwen2_vl',
        'vision': {'depth': 2, 'embed_dim': 32, 'num_heads': 2, 'mlp_ratio': 2},
        'text': {'hidden_size': 64, 'intermediate_size': 128, 'num_hidden_layers': 2,
                 'num_attention_heads': 4, 'num_key_value_heads': 2,
                 'mrope_section': [2, 3, 3], 'rope_theta': 1000000.0},
        'tie_word_embeddings': True,
    },
    'qwen2-b': {
        'family': 'qwen2_vl',
        'vision': {'depth': 3, 'embed_dim': 48, 'num_heads': 3, 'mlp_ratio': 2},
        'text': {'hidden_size': 96, 'intermediate_size': 160, 'num_hidden_layers': 2,
                 'num_attention_heads': 6, 'num_key_value_heads': 3,
                 'mrope_section': [4, 2, 2], 'rope_theta': 10000.0},
        'tie_word_embeddings': False,
    },
    'qwen25-a': {
        'family': 'qwen2_5_vl',
        # 112-pixel windows as published: libmtmd assumes that size whatever the files say.
        'vision': {'depth': 4, 'hidden_size': 32, 'intermediate_size': 64, 'num_heads': 2,
                   'window_size': 112, 'fullatt_block_indexes': [1, 3]},
        'text': {'hidden_size': 64, 'intermediate_size': 128, 'num_hidden_layers': 2,
                 'num_attention_heads': 4, 'num_key_value_heads': 2,
                 'mrope_section': [2, 3, 3], 'rope_theta': 1000000.0},
        'tie_word_embeddings': True,
    },
    'qwen25-b': {
        'family': 'qwen2_5_vl',
        'vision': {'depth': 3, 'hidden_size': 48, 'intermediate_size': 80, 'num_heads': 4,
                   'window_size': 112, 'fullatt_block_indexes': [2]},
        'text': {'hidden_size': 96, 'intermediate_size': 160, 'num_hidden_layers': 2,
                 'num_attention_heads': 6, 'num_key_value_heads': 3,
                 'mrope_section': [4, 2, 2], 'rope_theta': 10000.0},
        'tie_word_embeddings': False,
    },
}


def variant_spec(variant):
    """Return the shape dictionary of ``variant`` (a name in ``VARIANTS``)."""
    try:
        return VARIANTS[variant]
    except KeyError:
        raise ValueError(f'unknown variant {variant!r} (known: {sorted(VARIANTS)})') from None


def build_tokenizer():
    """Train and return the tiny Qwen2-style tokenizer with Qwen2-VL's added tokens."""
    return internvl_factory.build_tokenizer(added_tokens=ADDED_TOKENS)


def tokenizer_config(tokenizer):
    """Return the ``tokenizer_config.json`` dict (Qwen2-VL-2B-Instruct layout)."""
    return {
        'add_prefix_space': False,
        'added_tokens_decoder': tiny_tokenizer.added_tokens_decoder(tokenizer, ADDED_TOKENS),
        'additional_special_tokens': list(SPECIAL_TOKENS),
        'bos_token': None,
        'chat_template': CHAT_TEMPLATE,
        'clean_up_tokenization_spaces': False,
        'eos_token': IM_END_TOKEN,
        'errors': 'replace',
        'model_max_length': 32768,
        'pad_token': ENDOFTEXT_TOKEN,
        'padding_side': 'left',
        'processor_class': 'Qwen2VLProcessor',
        'split_special_tokens': False,
        'tokenizer_class': 'Qwen2Tokenizer',
        'unk_token': None,
    }


def special_tokens_map():
    """Return the ``special_tokens_map.json`` dict."""
    entry = tiny_tokenizer.token_entry
    return {
        'additional_special_tokens': list(SPECIAL_TOKENS),
        'eos_token': entry(IM_END_TOKEN),
        'pad_token': entry(ENDOFTEXT_TOKEN),
    }


def write_tokenizer(out_dir):
    """Write the tokenizer files into ``out_dir``; return the special token ids."""
    tokenizer = build_tokenizer()
    tiny_tokenizer.write_tokenizer_files(out_dir, tokenizer, tokenizer_config(tokenizer),
                                         special_tokens_map(), CHAT_TEMPLATE, sort_keys=True)
    ids = {name: tokenizer.token_to_id(token) for name, token in (
        ('endoftext_id', ENDOFTEXT_TOKEN), ('im_start_id', IM_START_TOKEN),
        ('im_end_id', IM_END_TOKEN), ('vision_start_id', VISION_START_TOKEN),
        ('vision_end_id', VISION_END_TOKEN), ('image_token_id', IMAGE_PAD_TOKEN),
        ('video_token_id', VIDEO_PAD_TOKEN))}
    ids['vocab_size'] = tokenizer.get_vocab_size(with_added_tokens=True)
    return ids


def make_config(variant, ids):
    """Return the transformers config of ``variant`` given the tokenizer's special ids."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    spec = variant_spec(variant)
    text = dict(spec['text'])
    mrope_section = text.pop('mrope_section')
    rope_theta = text.pop('rope_theta')
    head_dim = text['hidden_size'] // text['num_attention_heads']
    if sum(mrope_section) * 2 != head_dim:
        raise ValueError(f'mrope_section {mrope_section} must sum to head_dim/2 = {head_dim // 2}')
    text.update({
        'vocab_size': ids['vocab_size'],
        'max_position_embeddings': 4096,
        'rms_norm_eps': 1e-6,
        'hidden_act': 'silu',
        'rope_parameters': {'rope_type': 'default', 'rope_theta': rope_theta,
                            'mrope_section': list(mrope_section)},
        'use_sliding_window': False,
        'bos_token_id': ids['endoftext_id'],
        'eos_token_id': ids['im_end_id'],
        'tie_word_embeddings': spec['tie_word_embeddings'],
    })
    vision = dict(spec['vision'])
    vision.update({'in_channels': 3, 'patch_size': PATCH_SIZE, 'spatial_merge_size': MERGE_SIZE,
                   'temporal_patch_size': 2})
    common = {'image_token_id': ids['image_token_id'], 'video_token_id': ids['video_token_id'],
              'vision_start_token_id': ids['vision_start_id'],
              'vision_end_token_id': ids['vision_end_id'],
              'tie_word_embeddings': spec['tie_word_embeddings']}
    if spec['family'] == 'qwen2_vl':
        vision.update({'hidden_size': text['hidden_size'], 'hidden_act': 'quick_gelu'})
        return Qwen2VLConfig(vision_config=vision, text_config=text, **common)
    vision.update({'out_hidden_size': text['hidden_size'], 'hidden_act': 'silu',
                   'tokens_per_second': 2})
    return Qwen2_5_VLConfig(vision_config=vision, text_config=text, **common)


def preprocessor_config(variant):
    """Return the hub-style ``preprocessor_config.json`` dict (Qwen2VLImageProcessor)."""
    unit = PATCH_SIZE * MERGE_SIZE
    return {
        'do_convert_rgb': True,
        'do_normalize': True,
        'do_rescale': True,
        'do_resize': True,
        'image_mean': CLIP_MEAN,
        'image_processor_type': 'Qwen2VLImageProcessor',
        'image_std': CLIP_STD,
        'max_pixels': unit * unit * MAX_MERGED,
        'merge_size': MERGE_SIZE,
        'min_pixels': unit * unit * 4,
        'patch_size': PATCH_SIZE,
        'processor_class': ('Qwen2VLProcessor' if variant_spec(variant)['family'] == 'qwen2_vl'
                            else 'Qwen2_5_VLProcessor'),
        'resample': 3,
        'rescale_factor': 1.0 / 255.0,
        'temporal_patch_size': 2,
    }


def model_class(variant):
    """Return the transformers model class of ``variant``."""
    import transformers
    return (transformers.Qwen2VLForConditionalGeneration
            if variant_spec(variant)['family'] == 'qwen2_vl'
            else transformers.Qwen2_5_VLForConditionalGeneration)


def build_tiny_qwen2vl(out_dir, variant='qwen2-a', seed=0):
    """Write a tiny random-weight Qwen2(.5)-VL checkpoint into ``out_dir``; return its path."""
    os.makedirs(out_dir, exist_ok=True)
    ids = write_tokenizer(out_dir)
    model = hub_files.random_model(model_class(variant), make_config(variant, ids), seed)
    hub_files.save_checkpoint(
        model, out_dir,
        generation={'bos_token_id': ids['endoftext_id'],
                    'eos_token_id': [ids['im_end_id'], ids['endoftext_id']],
                    'pad_token_id': ids['endoftext_id']},
        preprocessor=preprocessor_config(variant),
        processor={'processor_class': preprocessor_config(variant)['processor_class']})
    return out_dir


def cached_qwen2vl_model(variant='qwen2-a', seed=0):
    """
    Return the directory of a tiny Qwen2(.5)-VL test model, building it only if missing.

    ``<model_cache.cache_root()>/qwen2vl-<variant>-<hash>`` (``model_cache.build_once``).
    """
    variant_spec(variant)
    return model_cache.build_once('qwen2vl', f'qwen2vl-{variant}', build_tiny_qwen2vl,
                                  variant=variant, seed=seed)


def load_processor(model_dir):
    """Load the transformers processor of a saved model directory (no network)."""
    with open(os.path.join(model_dir, 'processor_config.json'), encoding='utf-8') as f:
        processor_class = json.load(f)['processor_class']
    return hub_files.load_processor(model_dir, processor_class, None)
