"""
Build tiny random-weight InternVL checkpoints laid out like the transformers-format hub repos.

``build_tiny_internvl(out_dir, variant, seed)`` writes the file set of
OpenGVLab/InternVL3-1B-hf (config.json, generation_config.json, preprocessor_config.json,
processor_config.json, chat_template.json, tokenizer.json, tokenizer_config.json,
special_tokens_map.json, model.safetensors) for an ``InternVLForConditionalGeneration`` of a
few hundred kilobytes: an InternViT vision tower, pixel shuffle + MLP projector and a Qwen2
language model.  Nothing is downloaded.

The tokenizer is a small byte-level BPE trained locally with Qwen2's pipeline (NFC, the
Qwen2 split regex, byte level) followed by Qwen's ``<|endoftext|>``, ``<|im_start|>``,
``<|im_end|>`` and InternVL's ``<img>``, ``</img>``, ``<IMG_CONTEXT>`` ... added tokens.
Tiles are smaller than the real 448 pixels (the processor reads the tile size from
``preprocessor_config.json``), so a tile costs 16 or 36 image tokens instead of 256.

A variant is a name in ``VARIANTS`` or a shape dictionary of the same form; its vision
``image_size`` and ``patch_size`` are ints or square ``[height, width]`` lists, as
transformers' InternVL configs write them.
"""

import os

from tokenizers import decoders, models, normalizers, pre_tokenizers, Regex, Tokenizer

from . import hub_files, tiny_tokenizer

# Qwen2's pre-tokenizer split (transformers' Qwen2Tokenizer.PRETOKENIZE_REGEX).
QWEN2_SPLIT_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
                     r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

ENDOFTEXT_TOKEN = '<|endoftext|>'
IM_START_TOKEN = '<|im_start|>'
IM_END_TOKEN = '<|im_end|>'
START_IMAGE_TOKEN = '<img>'
END_IMAGE_TOKEN = '</img>'
CONTEXT_IMAGE_TOKEN = '<IMG_CONTEXT>'
VIDEO_TOKEN = '<video>'

# Qwen2.5's added tokens (a subset, in its order), then InternVL's.
QWEN_ADDED_TOKENS = [ENDOFTEXT_TOKEN, IM_START_TOKEN, IM_END_TOKEN, '<|vision_start|>',
                     '<|vision_end|>', '<|vision_pad|>', '<|image_pad|>', '<|video_pad|>']
INTERNVL_ADDED_TOKENS = [START_IMAGE_TOKEN, END_IMAGE_TOKEN, CONTEXT_IMAGE_TOKEN, '<quad>',
                         '</quad>', '<ref>', '</ref>', '<box>', '</box>', VIDEO_TOKEN]
BASE_VOCAB_SIZE = 384

# The chat template transformers' InternVL conversion script stores with the -hf repos.
CHAT_TEMPLATE = (
    '{% for message in messages %}'
    "{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    '{% else %}'
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}"
    "{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}"
    "{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}"
    '{% endif %}'
    '{% endfor %}'
    '{% endif %}'
    "{{'<|im_end|>\n'}}"
    '{% endfor %}'
    '{% if add_generation_prompt %}'
    "{{'<|im_start|>assistant\n' }}"
    '{% endif %}'
)

# Tiny shapes.  Tokens per tile = (image_size / patch_size)**2 * downsample_ratio**2.
VARIANTS = {
    'a': {
        'vision': {'hidden_size': 64, 'intermediate_size': 128, 'num_hidden_layers': 2,
                   'num_attention_heads': 4, 'image_size': 64, 'patch_size': 8,
                   'attention_bias': True, 'use_qk_norm': False, 'norm_type': 'layer_norm'},
        'text': {'hidden_size': 64, 'intermediate_size': 128, 'num_hidden_layers': 2,
                 'num_attention_heads': 4, 'num_key_value_heads': 2,
                 'rope_theta': 1000000.0},
        'downsample_ratio': 0.5,
        'tie_word_embeddings': True,
        'max_patches': 12,
    },
    'b': {
        'vision': {'hidden_size': 48, 'intermediate_size': 96, 'num_hidden_layers': 2,
                   'num_attention_heads': 3, 'image_size': 96, 'patch_size': 8,
                   'attention_bias': False, 'use_qk_norm': True, 'norm_type': 'rms_norm'},
        'text': {'hidden_size': 96, 'intermediate_size': 192, 'num_hidden_layers': 3,
                 'num_attention_heads': 6, 'num_key_value_heads': 3,
                 'rope_theta': 10000.0},
        'downsample_ratio': 0.5,
        'tie_word_embeddings': False,
        'max_patches': 6,
    },
}

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def variant_spec(variant):
    """Return the shape dictionary of ``variant``: a name in ``VARIANTS`` or the dict itself."""
    if isinstance(variant, dict):
        return variant
    if variant not in VARIANTS:
        known = ', '.join(sorted(VARIANTS))
        raise KeyError(f'unknown tiny InternVL variant {variant!r} (known: {known})')
    return VARIANTS[variant]


def square_size(vision, key):
    """
    Return ``vision[key]`` (``image_size`` or ``patch_size``) as one int.

    transformers' InternVL configs write both as ``[height, width]`` lists; an int or a
    square list (or tuple) is accepted, anything else raises ``ValueError``.
    """
    value = vision[key]
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f'InternVL vision {key} {list(value)}: only square sizes '
                             '(an int or [n, n]) are supported')
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f'InternVL vision {key} {value!r}: expected an int or [n, n]')
    return value


def patches_per_side(spec):
    """Return the patches along a tile's side (``image_size // patch_size``) of a spec."""
    vision = spec['vision']
    return square_size(vision, 'image_size') // square_size(vision, 'patch_size')


def image_seq_length(variant):
    """Return the number of ``<IMG_CONTEXT>`` tokens per tile for ``variant``."""
    spec = variant_spec(variant)
    side = patches_per_side(spec)
    return int(side * side * spec['downsample_ratio'] ** 2)


def build_tokenizer(base_vocab_size=BASE_VOCAB_SIZE, added_tokens=None):
    """
    Train and return the tiny Qwen2-style ``tokenizers.Tokenizer`` with InternVL tokens.

    ``added_tokens`` replaces Qwen's and InternVL's added tokens (another Qwen-based family).
    """
    tokenizer = Tokenizer(models.BPE(fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior='isolated', invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    return tiny_tokenizer.train_byte_level_bpe(
        tokenizer, base_vocab_size, tiny_tokenizer.training_lines(),
        added_tokens=(QWEN_ADDED_TOKENS + INTERNVL_ADDED_TOKENS if added_tokens is None
                      else added_tokens))


def tokenizer_config(tokenizer):
    """Return the ``tokenizer_config.json`` dict (InternVL3-1B-hf layout)."""
    return {
        'add_bos_token': False,
        'add_prefix_space': False,
        'added_tokens_decoder': tiny_tokenizer.added_tokens_decoder(
            tokenizer, QWEN_ADDED_TOKENS + INTERNVL_ADDED_TOKENS),
        'additional_special_tokens': list(INTERNVL_ADDED_TOKENS[:-1]),
        'bos_token': None,
        'chat_template': CHAT_TEMPLATE,
        'clean_up_tokenization_spaces': False,
        'context_image_token': CONTEXT_IMAGE_TOKEN,
        'end_image_token': END_IMAGE_TOKEN,
        'eos_token': IM_END_TOKEN,
        'errors': 'replace',
        'extra_special_tokens': {
            'context_image_token': CONTEXT_IMAGE_TOKEN,
            'end_image_token': END_IMAGE_TOKEN,
            'start_image_token': START_IMAGE_TOKEN,
            'video_token': VIDEO_TOKEN,
        },
        'model_max_length': 8192,
        'pad_token': ENDOFTEXT_TOKEN,
        'processor_class': 'InternVLProcessor',
        'return_token_type_ids': False,
        'split_special_tokens': False,
        'start_image_token': START_IMAGE_TOKEN,
        'tokenizer_class': 'Qwen2Tokenizer',
        'unk_token': None,
        'video_token': VIDEO_TOKEN,
    }


def special_tokens_map():
    """Return the ``special_tokens_map.json`` dict."""
    entry = tiny_tokenizer.token_entry
    return {
        'additional_special_tokens': [entry(t) for t in INTERNVL_ADDED_TOKENS[:-1]],
        'eos_token': entry(IM_END_TOKEN),
        'pad_token': entry(ENDOFTEXT_TOKEN),
    }


def write_tokenizer(out_dir):
    """Write the tokenizer files into ``out_dir``; return the special token ids."""
    tokenizer = build_tokenizer()
    tiny_tokenizer.write_tokenizer_files(out_dir, tokenizer, tokenizer_config(tokenizer),
                                         special_tokens_map(), CHAT_TEMPLATE, sort_keys=True)
    return {
        'endoftext_id': tokenizer.token_to_id(ENDOFTEXT_TOKEN),
        'im_start_id': tokenizer.token_to_id(IM_START_TOKEN),
        'im_end_id': tokenizer.token_to_id(IM_END_TOKEN),
        'image_token_id': tokenizer.token_to_id(CONTEXT_IMAGE_TOKEN),
        'vocab_size': tokenizer.get_vocab_size(with_added_tokens=True),
    }


def make_config(variant, ids):
    """Return an ``InternVLConfig`` for ``variant`` given the tokenizer's special ids."""
    from transformers import InternVLConfig

    spec = variant_spec(variant)
    if (patches_per_side(spec) * spec['downsample_ratio']) % 1:
        raise ValueError('patches per side times downsample_ratio must be an integer')
    vision = dict(spec['vision'])
    vision.update({
        'image_size': square_size(vision, 'image_size'),
        'patch_size': square_size(vision, 'patch_size'),
        'hidden_act': 'gelu',
        'layer_norm_eps': 1e-6,
        'layer_scale_init_value': 0.1,
        'use_absolute_position_embeddings': True,
        'use_mask_token': False,
        'use_mean_pooling': True,
    })
    text = dict(spec['text'])
    rope_theta = text.pop('rope_theta')
    text.update({
        'model_type': 'qwen2',
        'vocab_size': ids['vocab_size'],
        'max_position_embeddings': 4096,
        'rms_norm_eps': 1e-6,
        'hidden_act': 'silu',
        'rope_parameters': {'rope_type': 'default', 'rope_theta': rope_theta},
        'use_sliding_window': False,
        'bos_token_id': ids['endoftext_id'],
        'eos_token_id': ids['im_end_id'],
        'tie_word_embeddings': spec['tie_word_embeddings'],
        'use_cache': True,
    })
    return InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=ids['image_token_id'],
        image_seq_length=image_seq_length(variant),
        downsample_ratio=spec['downsample_ratio'],
        projector_hidden_act='gelu',
        vision_feature_layer=-1,
        vision_feature_select_strategy='default',
        tie_word_embeddings=spec['tie_word_embeddings'],
    )


def preprocessor_config(variant):
    """Return the hub-style ``preprocessor_config.json`` dict (GotOcr2 image processor)."""
    spec = variant_spec(variant)
    tile = square_size(spec['vision'], 'image_size')
    # As saved by the conversion script: crop_to_patches false here, the InternVLProcessor
    # turns it on at call time.
    return {
        'crop_size': None,
        'crop_to_patches': False,
        'data_format': 'channels_first',
        'default_to_square': True,
        'device': None,
        'do_center_crop': None,
        'do_convert_rgb': True,
        'do_normalize': True,
        'do_rescale': True,
        'do_resize': True,
        'image_mean': IMAGENET_MEAN,
        'image_processor_type': 'GotOcr2ImageProcessorFast',
        'image_std': IMAGENET_STD,
        'input_data_format': None,
        'max_patches': spec['max_patches'],
        'min_patches': 1,
        'processor_class': 'InternVLProcessor',
        'resample': 3,
        'rescale_factor': 1.0 / 255.0,
        'return_tensors': None,
        'size': {'height': tile, 'width': tile},
    }


def build_tiny_internvl(out_dir, variant='a', seed=0):
    """Write a tiny random-weight InternVL checkpoint into ``out_dir`` and return its path."""
    from transformers import InternVLForConditionalGeneration

    variant_spec(variant)
    os.makedirs(out_dir, exist_ok=True)
    ids = write_tokenizer(out_dir)
    model = hub_files.random_model(InternVLForConditionalGeneration, make_config(variant, ids),
                                   seed)
    hub_files.save_checkpoint(
        model, out_dir,
        generation={'bos_token_id': ids['endoftext_id'],
                    'eos_token_id': [ids['im_end_id'], ids['endoftext_id']],
                    'pad_token_id': ids['endoftext_id']},
        preprocessor=preprocessor_config(variant),
        processor={'image_seq_length': image_seq_length(variant),
                   'processor_class': 'InternVLProcessor'})
    return out_dir


def load_processor(model_dir):
    """
    Load the transformers ``InternVLProcessor`` of a saved model directory (no network).

    ``AutoProcessor`` first; transformers insists on building the InternVL video processor,
    which needs torchvision, and without it the processor is assembled from the same files
    by hand (``hub_files.load_processor``).
    """
    return hub_files.load_processor(model_dir, 'InternVLProcessor', 'image_seq_length')
