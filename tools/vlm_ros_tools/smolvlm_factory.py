"""
Build tiny random-weight SmolVLM checkpoints laid out like the Hugging Face hub repos.

``build_tiny_smolvlm(out_dir, variant, seed)`` writes the same file set as
HuggingFaceTB/SmolVLM2-256M-Video-Instruct (config.json, generation_config.json,
preprocessor_config.json, processor_config.json, chat_template.json, tokenizer.json,
tokenizer_config.json, special_tokens_map.json, model.safetensors) for a model of a few
hundred kilobytes.  Nothing is downloaded.  Weights are drawn with a larger standard
deviation than a real initialisation so that the logits of the random model are well
separated and greedy decoding is a meaningful parity check.
"""

import contextlib
import json
import os

from . import tiny_tokenizer

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

# Standard deviation of the random weights (see module docstring).
WEIGHT_STD = 0.2


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


def _reinit_weights(model, seed):
    """Draw every parameter from a seeded generator (deterministic, well separated logits)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    seen = set()
    with torch.no_grad():
        for name, param in model.named_parameters(remove_duplicate=True):
            if param.data_ptr() in seen:
                continue
            seen.add(param.data_ptr())
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if param.ndim >= 2:
                param.copy_(noise * WEIGHT_STD)
            elif name.endswith('bias'):
                param.copy_(noise * 0.02)
            else:  # LayerNorm / RMSNorm scales
                param.copy_(1.0 + noise * 0.1)


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


def hubify_config(path, tiles_per_edge):
    """Rewrite config.json with the keys the hub configs carry (legacy names included)."""
    with open(path, encoding='utf-8') as f:
        cfg = json.load(f)
    if '_pad_token_id' in cfg:
        cfg['pad_token_id'] = cfg.pop('_pad_token_id')
    cfg['torch_dtype'] = cfg.get('dtype', 'float32')
    text = cfg['text_config']
    text['rope_theta'] = text['rope_parameters']['rope_theta']
    vision = cfg['vision_config']
    tile = vision['image_size']
    vision['max_image_size'] = {'longest_edge': tile}
    vision['size'] = {'longest_edge': tiles_per_edge * tile}
    cfg['vocab_size'] = text['vocab_size']
    _write_json(path, cfg)


def _write_json(path, data):
    """Write ``data`` as pretty-printed json."""
    with open(path, 'w', encoding='utf-8') as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write('\n')


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' progress bars and advisory warnings inside the block."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def build_tiny_smolvlm(out_dir, variant='a', seed=0):
    """Write a tiny random-weight SmolVLM checkpoint into ``out_dir`` and return its path."""
    import torch
    from transformers import GenerationConfig, SmolVLMForConditionalGeneration

    variant_spec(variant)
    os.makedirs(out_dir, exist_ok=True)
    ids = tiny_tokenizer.write_tiny_tokenizer(out_dir)
    config = make_config(variant, ids)
    torch.manual_seed(seed)
    model = SmolVLMForConditionalGeneration(config).to(torch.float32).eval()
    _reinit_weights(model, seed)
    model.generation_config = GenerationConfig(
        bos_token_id=ids['bos_token_id'],
        eos_token_id=[ids['im_end_token_id'], ids['eos_token_id']],
        pad_token_id=ids['pad_token_id'],
    )
    with quiet_transformers():
        model.save_pretrained(out_dir)
    hubify_config(os.path.join(out_dir, 'config.json'), variant_spec(variant)['tiles_per_edge'])
    _write_json(os.path.join(out_dir, 'preprocessor_config.json'), preprocessor_config(variant))
    _write_json(os.path.join(out_dir, 'processor_config.json'),
                {'image_seq_len': image_seq_len(variant), 'processor_class': 'SmolVLMProcessor'})
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
    Load the transformers processor of a saved model directory (no network).

    ``AutoProcessor`` is tried first.  transformers also insists on building the video
    processor, which needs torchvision; without it the processor is assembled from the
    same files by hand (PIL image processor, tokenizer, chat template, image_seq_len) with
    a generic video processor that images never use.
    """
    from transformers import AutoProcessor

    ensure_processor_importable()
    try:
        with quiet_transformers():
            return AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    except ImportError as exc:
        if 'orchvision' not in str(exc):
            raise
    with quiet_transformers():
        return _assemble_processor(model_dir)


def _assemble_processor(model_dir):
    """Build a ``SmolVLMProcessor`` from the files of ``model_dir`` without torchvision."""
    from transformers import AutoImageProcessor, AutoTokenizer, SmolVLMProcessor
    from transformers.video_processing_utils import BaseVideoProcessor

    with open(os.path.join(model_dir, 'processor_config.json'), encoding='utf-8') as f:
        proc_cfg = json.load(f)
    with open(os.path.join(model_dir, 'chat_template.json'), encoding='utf-8') as f:
        chat_template = json.load(f)['chat_template']
    image_processor = AutoImageProcessor.from_pretrained(model_dir, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)

    class _ImageOnlySmolVLMProcessor(SmolVLMProcessor):
        """SmolVLMProcessor that accepts a generic video processor."""

        def check_argument_for_proper_class(self, argument_name, argument):
            """Skip the class check of the video processor (needs torchvision)."""
            if argument_name == 'video_processor':
                return type(argument)
            return super().check_argument_for_proper_class(argument_name, argument)

    return _ImageOnlySmolVLMProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=BaseVideoProcessor(),
        image_seq_len=proc_cfg['image_seq_len'],
        chat_template=chat_template,
    )
