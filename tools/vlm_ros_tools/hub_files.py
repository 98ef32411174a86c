"""
What the tiny-model factories share: checkpoints written and read in the hub file layout.

``smolvlm_factory``, ``internvl_factory``, ``tiny_tokenizer`` and ``train_default`` write the
same kinds of files (pretty-printed json, seeded random weights saved with a generation
config, a ``config.json`` with the legacy keys the hub configs carry) and load the
transformers processor back the same way, with or without torchvision.  This module holds
that code once; what differs per family (configs, file contents, processor class) stays in
the factories.  torch and transformers are imported inside the functions only.
"""

import contextlib
import json
import os

# Standard deviation of the random weights: larger than a real initialisation, so that the
# logits of a random model are well separated and greedy decoding is a meaningful parity
# check.
WEIGHT_STD = 0.2


def write_json(path, data, sort_keys=True):
    """Write ``data`` as pretty-printed json (hub style; ``sort_keys`` as the file had it)."""
    with open(path, 'w', encoding='utf-8') as f:
        json.dump(data, f, indent=2, sort_keys=sort_keys, ensure_ascii=False)
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


def reinit_weights(model, seed):
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


def random_model(model_class, config, seed):
    """Return a float32 ``model_class(config)`` in eval mode with ``reinit_weights``' weights."""
    import torch

    torch.manual_seed(seed)
    with quiet_transformers():
        model = model_class(config).to(torch.float32).eval()
    reinit_weights(model, seed)
    return model


def save_checkpoint(model, out_dir, generation, preprocessor, processor, edit_config=None):
    """
    Save ``model`` and its config files into ``out_dir`` in the hub layout.

    ``generation`` holds the ``GenerationConfig`` arguments (token ids); ``preprocessor``
    and ``processor`` are the ``preprocessor_config.json`` and ``processor_config.json``
    dicts.  ``config.json`` is rewritten with the legacy keys every hub config carries
    (``torch_dtype``, the text config's ``rope_theta``), then ``edit_config(cfg)``'s own.
    """
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(**generation)
    with quiet_transformers():
        model.save_pretrained(out_dir)
    path = os.path.join(out_dir, 'config.json')
    with open(path, encoding='utf-8') as f:
        cfg = json.load(f)
    cfg['torch_dtype'] = cfg.get('dtype', 'float32')
    text = cfg['text_config']
    text['rope_theta'] = text['rope_parameters']['rope_theta']
    if edit_config is not None:
        edit_config(cfg)
    write_json(path, cfg)
    write_json(os.path.join(out_dir, 'preprocessor_config.json'), preprocessor)
    write_json(os.path.join(out_dir, 'processor_config.json'), processor)


def load_processor(model_dir, processor_class, seq_len_key):
    """
    Load the transformers processor of a saved model directory (no network).

    ``AutoProcessor`` is tried first.  transformers also insists on building the video
    processor, which needs torchvision; without it a ``processor_class`` (the transformers
    class name) is assembled from the same files by hand (image processor, tokenizer, chat
    template, ``processor_config.json``'s ``seq_len_key``) with a generic video processor
    that images never use.
    """
    from transformers import AutoProcessor

    try:
        with quiet_transformers():
            return AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    except (ImportError, ValueError) as exc:  # InternVL's video processor raises ValueError
        if 'orchvision' not in str(exc):
            raise
    with quiet_transformers():
        return _assemble_processor(model_dir, processor_class, seq_len_key)


def _assemble_processor(model_dir, processor_class, seq_len_key):
    """Build a ``processor_class`` from the files of ``model_dir`` without torchvision."""
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.video_processing_utils import BaseVideoProcessor

    with open(os.path.join(model_dir, 'processor_config.json'), encoding='utf-8') as f:
        proc_cfg = json.load(f)
    with open(os.path.join(model_dir, 'chat_template.json'), encoding='utf-8') as f:
        chat_template = json.load(f)['chat_template']
    image_processor = AutoImageProcessor.from_pretrained(model_dir, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)

    class ImageOnlyProcessor(getattr(transformers, processor_class)):
        """The family's processor that accepts a generic video processor."""

        def check_argument_for_proper_class(self, argument_name, argument):
            """Skip the class check of the video processor (needs torchvision)."""
            if argument_name == 'video_processor':
                return type(argument)
            return super().check_argument_for_proper_class(argument_name, argument)

    ImageOnlyProcessor.__name__ = ImageOnlyProcessor.__qualname__ = f'_ImageOnly{processor_class}'
    return ImageOnlyProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=BaseVideoProcessor(),
        chat_template=chat_template,
        **({seq_len_key: proc_cfg[seq_len_key]} if seq_len_key else {}),
    )
