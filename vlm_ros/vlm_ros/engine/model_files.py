"""
Finding a model's files: config JSONs and the ONNX / GGUF graphs beside them.

Relative paths resolve against the model directory, never against the working directory, so
a node started from anywhere reads the same files.
"""

from dataclasses import dataclass
import json
import os
import pathlib
from typing import Optional

from vlm_ros.engine.errors import ModelFilesError

ONNX_VARIANTS = ('fp32', 'fp16', 'int8', 'uint8', 'q4', 'q4f16', 'bnb4', 'quantized')


def load_json(model_dir, name, required=True):
    """Read ``name`` from ``model_dir``; {} when optional and absent."""
    path = pathlib.Path(model_dir) / name
    if not path.is_file():
        if required:
            raise ModelFilesError(f'{name} not found in {model_dir}')
        return {}
    try:
        return json.loads(path.read_text(encoding='utf-8'))
    except (OSError, ValueError) as exc:
        raise ModelFilesError(f'cannot read {path}: {exc}') from exc


def text_config(config):
    """Return the language model's part of a VLM config.json (InternVL: llm_config)."""
    return config.get('text_config') or config.get('llm_config') or config


def resolve(model_dir, path) -> pathlib.Path:
    """Resolve ``path`` against ``model_dir`` and check that it is a readable file."""
    p = pathlib.Path(os.path.expanduser(os.fspath(path)))
    if not p.is_absolute():
        p = pathlib.Path(model_dir) / p
    if not p.is_file():
        raise ModelFilesError(f'model file not found: {p}')
    if not os.access(p, os.R_OK):
        raise ModelFilesError(f'model file not readable: {p}')
    return p


def variant_suffix(variant):
    """File-name suffix of an ONNX precision variant ('' for fp32)."""
    if variant not in ONNX_VARIANTS:
        raise ModelFilesError(f'unknown ONNX variant {variant!r}; one of {ONNX_VARIANTS}')
    return '' if variant == 'fp32' else '_' + variant


@dataclass
class OnnxFiles:
    """The three graphs of an ONNX export."""

    vision: pathlib.Path
    embed: pathlib.Path
    decoder: pathlib.Path


def onnx_files(model_dir, variant='fp32', vision=None, decoder=None,
               embed=None) -> OnnxFiles:
    """
    Locate ``onnx/{vision_encoder,embed_tokens,decoder_model_merged}{_variant}.onnx``.

    Explicit ``vision`` / ``decoder`` / ``embed`` paths win; the embedder defaults to the
    decoder's precision (``decoder_model_merged_int8.onnx`` -> ``embed_tokens_int8.onnx``),
    then to fp32, as the hub repositories ship both.
    """
    model_dir = pathlib.Path(model_dir)
    suffix = variant_suffix(variant)
    vision_path = resolve(model_dir, vision or f'onnx/vision_encoder{suffix}.onnx')
    decoder_path = resolve(model_dir, decoder or f'onnx/decoder_model_merged{suffix}.onnx')
    if embed is None:
        stem = decoder_path.stem
        dec_suffix = stem.split('decoder_model_merged', 1)[1] if stem.startswith(
            'decoder_model_merged') else ''
        candidates = [decoder_path.parent / f'embed_tokens{dec_suffix}.onnx',
                      decoder_path.parent / 'embed_tokens.onnx']
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise ModelFilesError(f'no token embedder beside {decoder_path} (looked for '
                                  f'{", ".join(c.name for c in candidates)})')
        embed_path = found
    else:
        embed_path = resolve(model_dir, embed)
    return OnnxFiles(vision_path, embed_path, decoder_path)


def find_model_dir(path) -> Optional[pathlib.Path]:
    """Find the folder with config.json for a model file: its own folder or the parent."""
    p = pathlib.Path(path).resolve()
    for folder in (p.parent, p.parent.parent):
        if (folder / 'config.json').is_file():
            return folder
    return None
