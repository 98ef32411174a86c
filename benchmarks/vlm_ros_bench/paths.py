"""
The measured paths: what runs the vision encoder and the decoder, and from which files.

``kind`` selects the worker code: ``transformers`` (the PyTorch reference), ``pipeline``
(our engine with an ONNX vision encoder and an ONNX or GGUF decoder), ``mtmd`` (our engine
with llama.cpp's projector) and ``raw`` (llama.cpp's decode loop with none of our code).
"""

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class BenchPath:
    """One way of answering the benchmark question."""

    name: str
    kind: str
    vision: str
    """Who encodes the image (``none`` for the raw language-model loop)."""
    decoder: str
    """Runtime and precision of the language model."""
    onnx_variant: Optional[str] = None
    gguf_type: Optional[str] = None

    def describe(self):
        """Return the path as a JSON-ready dict."""
        return {'name': self.name, 'kind': self.kind, 'vision': self.vision,
                'decoder': self.decoder, 'onnx_variant': self.onnx_variant,
                'gguf_type': self.gguf_type}


PATHS = (
    BenchPath('transformers-fp32', 'transformers', 'transformers fp32', 'transformers fp32'),
    BenchPath('onnx-fp32', 'pipeline', 'onnxruntime fp32', 'onnxruntime fp32',
              onnx_variant='fp32'),
    BenchPath('onnx-int8', 'pipeline', 'onnxruntime int8', 'onnxruntime int8',
              onnx_variant='int8'),
    BenchPath('onnx-vision+llamacpp-f16', 'pipeline', 'onnxruntime fp32', 'llama.cpp f16',
              onnx_variant='fp32', gguf_type='f16'),
    # A quantized language model goes with the int8 vision encoder: the same trade of
    # precision for speed and memory, and the vision encoder is most of the first token.
    BenchPath('onnx-int8-vision+llamacpp-q8_0', 'pipeline', 'onnxruntime int8',
              'llama.cpp q8_0', onnx_variant='int8', gguf_type='q8_0'),
    BenchPath('onnx-int8-vision+llamacpp-q4_0', 'pipeline', 'onnxruntime int8',
              'llama.cpp q4_0', onnx_variant='int8', gguf_type='q4_0'),
    BenchPath('mtmd+llamacpp-q8_0', 'mtmd', 'llama.cpp mtmd', 'llama.cpp q8_0',
              gguf_type='q8_0'),
    BenchPath('llamacpp-raw-f16', 'raw', 'none', 'llama.cpp f16 (raw loop)', gguf_type='f16'),
    BenchPath('llamacpp-raw-q8_0', 'raw', 'none', 'llama.cpp q8_0 (raw loop)',
              gguf_type='q8_0'),
    BenchPath('llamacpp-raw-q4_0', 'raw', 'none', 'llama.cpp q4_0 (raw loop)',
              gguf_type='q4_0'),
)
BY_NAME = {p.name: p for p in PATHS}


def select(names=None):
    """Return the paths named in ``names`` (all when empty), in the canonical order."""
    if not names:
        return list(PATHS)
    unknown = sorted(set(names) - set(BY_NAME))
    if unknown:
        raise KeyError(f'unknown paths {unknown} (known: {", ".join(BY_NAME)})')
    return [p for p in PATHS if p.name in names]


def case_files(path, manifest, split):
    """Return the files of ``path`` for one split setting, relative to the model folder."""
    files = manifest['files']
    out = {}
    if path.onnx_variant:
        graphs = files['onnx'][path.onnx_variant]
        out.update(vision_model=graphs['vision'], embed_model=graphs['embed'],
                   decoder_model=graphs['decoder'])
    if path.gguf_type:
        out['decoder_model'] = files['gguf'][path.gguf_type]
    if path.kind == 'mtmd':
        out['vision_model'] = files['mmproj']['split' if split else 'nosplit']
        out['mmproj_type'] = files['mmproj']['type']
    if path.onnx_variant is None or path.gguf_type:
        out.pop('embed_model', None)
    return out
