"""
Export the vision tower of a transformers-format Qwen2-VL / Qwen2.5-VL checkpoint to ONNX.

The language model runs in llama.cpp (``gguf_export``, architecture ``qwen2vl``); this writes
the vision encoder the engine feeds it from, ``onnx/vision_encoder.onnx`` (and
``vision_encoder_int8.onnx``):

inputs
    ``pixel_values`` float32 [patches, channels x temporal x patch x patch]: the image
    processor's patches of one image, in its order (2x2 merge blocks, blocks in raster order).
    ``rotary_cos`` / ``rotary_sin`` float32 [patches, head_dim]: the 2-D rotary embedding of
    each patch (its row and column in the grid).
    Qwen2.5-VL only: ``window_ids`` int64 [patches], the attention window of each patch:
    window layers attend within a window, the ``fullatt_block_indexes`` layers to all.
output
    ``image_features`` float32 [tokens, text_hidden]: ``get_image_features`` of the image,
    one row per ``<|image_pad|>`` in raster order.

Everything that depends on the image grid (rotary angles, window partition) is computed with
numpy by the engine's family (``qwen2_vl.vision_tower_inputs``), so the graph holds no loops
over images or windows. transformers reorders Qwen2.5-VL's patches window by window and
attends window by window; a mask over the processor's order is the same attention (each
patch sees the same others), and the merger's 2x2 blocks and the output stay in raster
order, so nothing is reordered here. One image per run: the engine encodes images one at a
time, so attention across images never needs masking.
"""

import os

import torch
from torch import nn

from . import export_onnx, model_cache


def _attend(attn, hidden, cos, sin, bias):
    """One vision attention layer on ``hidden`` [n, dim] with rotary ``cos``/``sin``."""
    n = hidden.shape[0]
    heads = attn.num_heads
    qkv = attn.qkv(hidden).reshape(n, 3, heads, -1).permute(1, 2, 0, 3)  # [3, heads, n, d]
    q, k, v = qkv[0], qkv[1], qkv[2]

    def rotate(x):
        half = x.shape[-1] // 2
        return torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    q = q * cos + rotate(q) * sin
    k = k * cos + rotate(k) * sin
    scores = torch.matmul(q, k.transpose(1, 2)) * attn.scaling
    if bias is not None:
        scores = scores + bias
    out = torch.matmul(torch.softmax(scores, dim=-1), v)  # [heads, n, d]
    return attn.proj(out.transpose(0, 1).reshape(n, -1))


class VisionEncoderGraph(nn.Module):
    """Grid-independent vision tower: patches + rotary tables (+ windows) -> features."""

    def __init__(self, model):
        """Wrap the vision tower (patch embedding, blocks, merger) of a Qwen2(.5)-VL model."""
        super().__init__()
        self.visual = model.model.visual
        vision = model.config.vision_config
        self.windowed = hasattr(vision, 'fullatt_block_indexes')
        self.full = set(getattr(vision, 'fullatt_block_indexes', None) or [])

    def forward(self, pixel_values, rotary_cos, rotary_sin, window_ids=None):
        """Encode one image's patches."""
        visual = self.visual
        hidden = visual.patch_embed(pixel_values)
        cos, sin = rotary_cos[None], rotary_sin[None]  # broadcast over heads
        bias = None
        if self.windowed:
            same = window_ids[:, None] == window_ids[None, :]
            bias = torch.where(same, torch.zeros((), dtype=hidden.dtype),
                               torch.full((), float('-inf'), dtype=hidden.dtype))[None]
        for i, block in enumerate(visual.blocks):
            mask = None if (not self.windowed or i in self.full) else bias
            hidden = hidden + _attend(block.attn, block.norm1(hidden), cos, sin, mask)
            hidden = hidden + block.mlp(block.norm2(hidden))
        return visual.merger(hidden)


SINGLE_FILE_LIMIT = 1800 * 2 ** 20
"""Weights above this go to ``vision_encoder.onnx.data`` (protobuf stops at 2 GB)."""


def export_vision_encoder(model, path):
    """
    Write ``vision_encoder.onnx`` (traced on a 4x6 patch grid).

    ``model`` needs only ``model.model.visual`` and ``model.config``. A graph whose weights
    pass ``SINGLE_FILE_LIMIT`` (the published 2B tower in float32: 2.5 GB) keeps them in one
    ``vision_encoder.onnx.data`` beside it, which ONNX Runtime reads from there.
    """
    import tempfile

    import onnx

    vision = model.config.vision_config
    dim = getattr(vision, 'embed_dim', None) or vision.hidden_size
    head_dim = dim // vision.num_heads
    patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
    n = 24
    graph = VisionEncoderGraph(model).eval()
    args = [torch.randn(n, patch), torch.randn(n, head_dim), torch.randn(n, head_dim)]
    names = ['pixel_values', 'rotary_cos', 'rotary_sin']
    axes = {name: {0: 'patches'} for name in names}
    if graph.windowed:
        args.append(torch.arange(n) // 8)
        names.append('window_ids')
        axes['window_ids'] = {0: 'patches'}
    axes['image_features'] = {0: 'tokens'}
    out_dir = os.path.dirname(os.path.abspath(path))
    with tempfile.TemporaryDirectory(prefix='.export-', dir=out_dir) as tmp:
        traced = os.path.join(tmp, 'vision_encoder.onnx')
        export_onnx._export(graph, tuple(args), traced, names, ['image_features'], axes)
        size = sum(os.path.getsize(os.path.join(tmp, name)) for name in os.listdir(tmp))
        proto = onnx.load(traced)  # with its weights, wherever torch put them
        # The exporter loses the (static) feature width; write it back.
        width = model.config.text_config.hidden_size
        for output in proto.graph.output:
            if output.name == 'image_features':
                dim = output.type.tensor_type.shape.dim[1]
                dim.Clear()
                dim.dim_value = int(width)
        if size <= SINGLE_FILE_LIMIT:
            onnx.save_model(proto, path)
        else:
            onnx.save_model(proto, path, save_as_external_data=True,
                            all_tensors_to_one_file=True,
                            location=os.path.basename(path) + '.data', size_threshold=1024)


def export_qwen2vl_onnx(model_dir, onnx_dir=None, quantize_int8=True):
    """Export the vision encoder of the Qwen2(.5)-VL in ``model_dir``; return name -> file."""
    onnx_dir = onnx_dir or os.path.join(model_dir, 'onnx')
    os.makedirs(onnx_dir, exist_ok=True)
    model = export_onnx.load_model_for_export(model_dir)
    path = os.path.join(onnx_dir, 'vision_encoder.onnx')
    with torch.no_grad():
        export_vision_encoder(model, path)
    written = {'vision_encoder': path}
    if quantize_int8:
        int8 = os.path.join(onnx_dir, 'vision_encoder' + export_onnx.INT8_SUFFIX + '.onnx')
        export_onnx.quantize_graph_int8(path, int8)
        written['vision_encoder' + export_onnx.INT8_SUFFIX] = int8
    return written


def write_qwen2vl_model(out_dir, variant='qwen2-a', seed=0, quantize_int8=True):
    """Build a tiny Qwen2(.5)-VL in ``out_dir`` and export its vision encoder."""
    from .qwen2vl_factory import build_tiny_qwen2vl

    build_tiny_qwen2vl(out_dir, variant=variant, seed=seed)
    export_qwen2vl_onnx(out_dir, quantize_int8=quantize_int8)
    return out_dir


def cached_qwen2vl_onnx_model(variant='qwen2-a', seed=0, quantize_int8=True):
    """Return the folder of a tiny Qwen2(.5)-VL with its ONNX vision encoder (built once)."""
    return model_cache.build_once('qwen2vl-onnx', f'qwen2vl-onnx-{variant}',
                                  write_qwen2vl_model, variant=variant, seed=seed,
                                  quantize_int8=bool(quantize_int8))


def main(argv=None):
    """Command line: export a checkpoint's vision encoder, or build + export a tiny one."""
    from .qwen2vl_factory import build_tiny_qwen2vl

    return export_onnx.command_line(argv, 'Qwen2-VL / Qwen2.5-VL (vision encoder)',
                                    build_tiny_qwen2vl, export_qwen2vl_onnx)


if __name__ == '__main__':
    raise SystemExit(main())
