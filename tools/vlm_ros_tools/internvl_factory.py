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
"""

import json
import os

from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, Regex
from tokenizers import Tokenizer, trainers

from . import smolvlm_factory, tiny_tokenizer

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
    """Return the shape dictionary of ``variant`` (raises ``KeyError`` if unknown)."""
    if variant not in VARIANTS:
        known = ', '.join(sorted(VARIANTS))
        raise KeyError(f'unknown tiny InternVL variant {variant!r} (known: {known})')
    return VARIANTS[variant]


def image_seq_length(variant):
    """Return the number of ``<IMG_CONTEXT>`` tokens per tile for ``variant``."""
    spec = variant_spec(variant)
    side = spec['vision']['image_size'] // spec['vision']['patch_size']
    return int(side * side * spec['downsample_ratio'] ** 2)


def build_tokenizer(base_vocab_size=BASE_VOCAB_SIZE):
    """Train and return the tiny Qwen2-style ``tokenizers.Tokenizer`` with InternVL tokens."""
    tokenizer = Tokenizer(models.BPE(fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior='isolated', invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=base_vocab_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    lines = [line for line in tiny_tokenizer.TRAINING_TEXT.splitlines() if line]
    tokenizer.train_from_iterator(lines, trainer=trainer, length=len(lines))
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t in QWEN_ADDED_TOKENS + INTERNVL_ADDED_TOKENS])
    return tokenizer


def _token_entry(content):
    """Return the serialised form of a special token as in the hub json files."""
    return {'content': content, 'lstrip': False, 'normalized': False,
            'rstrip': False, 'single_word': False}


def tokenizer_config(tokenizer):
    """Return the ``tokenizer_config.json`` dict (InternVL3-1B-hf layout)."""
    added = {}
    for token in QWEN_ADDED_TOKENS + INTERNVL_ADDED_TOKENS:
        entry = _token_entry(token)
        entry['special'] = True
        added[str(tokenizer.token_to_id(token))] = entry
    return {
        'add_bos_token': False,
        'add_prefix_space': False,
        'added_tokens_decoder': added,
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
    return {
        'additional_special_tokens': [_token_entry(t) for t in INTERNVL_ADDED_TOKENS[:-1]],
        'eos_token': _token_entry(IM_END_TOKEN),
        'pad_token': _token_entry(ENDOFTEXT_TOKEN),
    }


def write_tokenizer(out_dir):
    """Write the tokenizer files into ``out_dir``; return the special token ids."""
    os.makedirs(out_dir, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.save(os.path.join(out_dir, 'tokenizer.json'))
    _write_json(os.path.join(out_dir, 'tokenizer_config.json'), tokenizer_config(tokenizer))
    _write_json(os.path.join(out_dir, 'special_tokens_map.json'), special_tokens_map())
    _write_json(os.path.join(out_dir, 'chat_template.json'), {'chat_template': CHAT_TEMPLATE})
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
    vision = dict(spec['vision'])
    side = vision['image_size'] // vision['patch_size']
    if (side * spec['downsample_ratio']) % 1:
        raise ValueError('patches per side times downsample_ratio must be an integer')
    vision.update({
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
    tile = spec['vision']['image_size']
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


def _write_json(path, data):
    """Write ``data`` as pretty-printed json."""
    with open(path, 'w', encoding='utf-8') as f:
        json.dump(data, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write('\n')


def _hubify_config(path):
    """Rewrite config.json with the keys the hub configs carry (legacy names included)."""
    with open(path, encoding='utf-8') as f:
        cfg = json.load(f)
    cfg['torch_dtype'] = cfg.get('dtype', 'float32')
    text = cfg['text_config']
    text['rope_theta'] = text['rope_parameters']['rope_theta']
    _write_json(path, cfg)


def build_tiny_internvl(out_dir, variant='a', seed=0):
    """Write a tiny random-weight InternVL checkpoint into ``out_dir`` and return its path."""
    import torch
    from transformers import GenerationConfig, InternVLForConditionalGeneration

    variant_spec(variant)
    os.makedirs(out_dir, exist_ok=True)
    ids = write_tokenizer(out_dir)
    config = make_config(variant, ids)
    torch.manual_seed(seed)
    with smolvlm_factory.quiet_transformers():
        model = InternVLForConditionalGeneration(config).to(torch.float32).eval()
    # Larger weights than a real initialisation: well separated logits (see smolvlm_factory).
    smolvlm_factory._reinit_weights(model, seed)
    model.generation_config = GenerationConfig(
        bos_token_id=ids['endoftext_id'],
        eos_token_id=[ids['im_end_id'], ids['endoftext_id']],
        pad_token_id=ids['endoftext_id'],
    )
    with smolvlm_factory.quiet_transformers():
        model.save_pretrained(out_dir)
    _hubify_config(os.path.join(out_dir, 'config.json'))
    _write_json(os.path.join(out_dir, 'preprocessor_config.json'), preprocessor_config(variant))
    _write_json(os.path.join(out_dir, 'processor_config.json'),
                {'image_seq_length': image_seq_length(variant),
                 'processor_class': 'InternVLProcessor'})
    return out_dir


def load_processor(model_dir):
    """
    Load the transformers ``InternVLProcessor`` of a saved model directory (no network).

    ``AutoProcessor`` is tried first.  transformers insists on building the InternVL video
    processor, which needs torchvision; without it the processor is assembled from the same
    files by hand (the PIL GotOcr2 image processor, tokenizer, chat template,
    image_seq_length) with a generic video processor that images never use.
    """
    from transformers import AutoProcessor

    try:
        with smolvlm_factory.quiet_transformers():
            return AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    except (ImportError, ValueError) as exc:  # the video processor raises ValueError
        if 'orchvision' not in str(exc):
            raise
    with smolvlm_factory.quiet_transformers():
        return _assemble_processor(model_dir)


def _assemble_processor(model_dir):
    """Build an ``InternVLProcessor`` from the files of ``model_dir`` without torchvision."""
    from transformers import AutoImageProcessor, AutoTokenizer, InternVLProcessor
    from transformers.video_processing_utils import BaseVideoProcessor

    with open(os.path.join(model_dir, 'processor_config.json'), encoding='utf-8') as f:
        proc_cfg = json.load(f)
    with open(os.path.join(model_dir, 'chat_template.json'), encoding='utf-8') as f:
        chat_template = json.load(f)['chat_template']
    image_processor = AutoImageProcessor.from_pretrained(model_dir, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)

    class _ImageOnlyInternVLProcessor(InternVLProcessor):
        """InternVLProcessor that accepts a generic video processor."""

        def check_argument_for_proper_class(self, argument_name, argument):
            """Skip the class check of the video processor (needs torchvision)."""
            if argument_name == 'video_processor':
                return type(argument)
            return super().check_argument_for_proper_class(argument_name, argument)

    return _ImageOnlyInternVLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=BaseVideoProcessor(),
        image_seq_length=proc_cfg['image_seq_length'],
        chat_template=chat_template,
    )
