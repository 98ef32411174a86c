"""
Export a transformers-format InternVL checkpoint to the three-graph ONNX layout.

Same file names, input and output names as the SmolVLM export (``export_onnx``), so the
engine's ONNX runtime loads both families alike:

``vision_encoder.onnx``
    ``pixel_values`` float32 [num_tiles, 3, tile, tile] -> ``image_features`` float32
    [num_tiles, tokens_per_tile, text_hidden]: InternViT, the CLS token dropped, pixel
    shuffle and the MLP projector, i.e. what ``get_image_features`` returns.
``embed_tokens.onnx``
    ``input_ids`` int64 [batch, seq] -> ``inputs_embeds`` float32 [batch, seq, hidden].
``decoder_model_merged.onnx``
    ``inputs_embeds``, ``attention_mask``, ``position_ids``, ``past_key_values.{i}.key`` /
    ``.value`` -> ``logits``, ``present.{i}.key`` / ``.value`` (the Qwen2 language model and
    its head; one graph for prefill and decode steps).

Plus ``*_int8.onnx`` (dynamic int8 weights).  The token embedder, decoder and quantiser are
``export_onnx``'s, applied to InternVL's language model; ``cached_internvl_model`` caches
a built + exported tiny model like ``export_onnx.cached_test_model``.
"""

import hashlib
import os
import shutil
import tempfile
import types

import torch
from torch import nn

from . import export_onnx

GRAPH_NAMES = export_onnx.GRAPH_NAMES
INT8_SUFFIX = export_onnx.INT8_SUFFIX


class VisionEncoderGraph(nn.Module):
    """``pixel_values`` (one row per tile) -> projected ``image_features``."""

    def __init__(self, model):
        """Wrap the vision tower and projector of an ``InternVLForConditionalGeneration``."""
        super().__init__()
        config = model.config
        if config.vision_feature_layer != -1:
            raise NotImplementedError(
                f'vision_feature_layer {config.vision_feature_layer}: only -1 (the last '
                'layer, as every InternVL2.5 / InternVL3 checkpoint uses) is exported')
        if config.vision_feature_select_strategy != 'default':
            raise NotImplementedError('vision_feature_select_strategy '
                                      f'{config.vision_feature_select_strategy!r} is not exported')
        self.vision = model.model.vision_tower
        self.projector = model.model.multi_modal_projector
        vision = config.vision_config
        self.side = vision.image_size[0] // vision.patch_size[0]
        if vision.image_size[0] != vision.image_size[1] or \
                vision.patch_size[0] != vision.patch_size[1]:
            raise NotImplementedError('only square tiles and patches are exported')
        self.ratio = config.downsample_ratio

    def _pixel_shuffle(self, x):
        """``InternVLModel.pixel_shuffle`` with a dynamic tile count (static ints elsewhere)."""
        side, ratio = self.side, self.ratio
        dim = x.shape[-1]
        small = int(side * ratio)
        x = x.reshape(-1, side, small, int(dim / ratio))
        x = x.permute(0, 2, 1, 3)
        x = x.reshape(-1, small, small, int(dim / (ratio * ratio)))
        x = x.permute(0, 2, 1, 3)
        return x.reshape(-1, small * small, int(dim / (ratio * ratio)))

    def forward(self, pixel_values):
        """Encode every tile."""
        emb = self.vision.embeddings
        hidden = emb.patch_embeddings(pixel_values)
        cls = emb.cls_token.expand(hidden.shape[0], -1, -1)
        hidden = torch.cat([cls, hidden], dim=1)
        # Tiles always have the trained size: the position table applies as is (transformers
        # interpolates it only for other sizes, or always while tracing).
        if emb.position_embeddings is not None:
            hidden = hidden + emb.position_embeddings
        for layer in self.vision.encoder.layer:
            hidden = layer(hidden)
        hidden = self.vision.layernorm(hidden)
        hidden = hidden[:, 1:, :]
        hidden = hidden.reshape(-1, self.side, self.side, hidden.shape[-1])
        return self.projector(self._pixel_shuffle(hidden))


def load_model_for_export(model_dir):
    """Load a saved InternVL in float32 with eager attention (exportable)."""
    from transformers import InternVLForConditionalGeneration

    from .smolvlm_factory import quiet_transformers

    with quiet_transformers():
        model = InternVLForConditionalGeneration.from_pretrained(
            model_dir, attn_implementation='eager', dtype=torch.float32, local_files_only=True)
    return model.eval()


def tokens_per_tile(config):
    """Return the image tokens one tile becomes: (tile / patch)**2 * downsample_ratio**2."""
    vision = config.vision_config
    side = vision.image_size[0] // vision.patch_size[0]
    return int(side * side * config.downsample_ratio ** 2)


def export_vision_encoder(model, path):
    """Write ``vision_encoder.onnx``."""
    tile = model.config.vision_config.image_size[0]
    pixel_values = torch.randn(2, 3, tile, tile)
    export_onnx._export(
        VisionEncoderGraph(model).eval(), (pixel_values,), path,
        ['pixel_values'], ['image_features'],
        {'pixel_values': {0: 'num_tiles'}, 'image_features': {0: 'num_tiles'}})
    # The exporter loses the (static) token count per tile; write it back.
    export_onnx._set_output_dims(path, 'image_features', {
        1: tokens_per_tile(model.config),
        2: model.config.text_config.hidden_size,
    })


def _text_view(model):
    """Present InternVL's language model the way ``export_onnx``'s graphs expect (SmolVLM)."""
    return types.SimpleNamespace(
        config=model.config,
        model=types.SimpleNamespace(text_model=model.model.language_model),
        lm_head=model.lm_head,
        get_input_embeddings=model.get_input_embeddings,
    )


def export_embed_tokens(model, path):
    """Write ``embed_tokens.onnx``."""
    export_onnx.export_embed_tokens(_text_view(model), path)


def export_decoder(model, path):
    """Write ``decoder_model_merged.onnx``."""
    export_onnx.export_decoder(_text_view(model), path)


def export_internvl_onnx(model_dir, onnx_dir=None, quantize_int8=True):
    """
    Export the InternVL model in ``model_dir`` to ``onnx_dir`` (default ``model_dir/onnx``).

    Returns a dict mapping graph names (``vision_encoder``, ``vision_encoder_int8``, ...)
    to the written files.
    """
    onnx_dir = onnx_dir or os.path.join(model_dir, 'onnx')
    os.makedirs(onnx_dir, exist_ok=True)
    model = load_model_for_export(model_dir)
    exporters = {
        'vision_encoder': export_vision_encoder,
        'embed_tokens': export_embed_tokens,
        'decoder_model_merged': export_decoder,
    }
    written = {}
    with torch.no_grad():
        for name in GRAPH_NAMES:
            path = os.path.join(onnx_dir, name + '.onnx')
            exporters[name](model, path)
            written[name] = path
    if quantize_int8:
        for name in GRAPH_NAMES:
            path = os.path.join(onnx_dir, name + INT8_SUFFIX + '.onnx')
            export_onnx.quantize_graph_int8(written[name], path)
            written[name + INT8_SUFFIX] = path
    return written


def write_internvl_model(out_dir, variant='a', seed=0, quantize_int8=True):
    """Build a tiny InternVL in ``out_dir`` and export its ONNX graphs; return ``out_dir``."""
    from .internvl_factory import build_tiny_internvl

    build_tiny_internvl(out_dir, variant=variant, seed=seed)
    export_internvl_onnx(out_dir, quantize_int8=quantize_int8)
    return out_dir


def _source_fingerprint(variant, seed, quantize):
    """Hash of the tooling sources, library versions and build arguments."""
    import onnx
    import onnxruntime
    import tokenizers
    import transformers

    digest = hashlib.sha256()
    here = os.path.dirname(os.path.abspath(__file__))
    for name in ('tiny_tokenizer.py', 'smolvlm_factory.py', 'export_onnx.py',
                 'internvl_factory.py', 'export_internvl.py'):
        with open(os.path.join(here, name), 'rb') as f:
            digest.update(f.read())
    for mod in (torch, transformers, onnx, onnxruntime, tokenizers):
        digest.update(f'{mod.__name__}={mod.__version__};'.encode())
    digest.update(f'internvl;{variant};{seed};{int(bool(quantize))}'.encode())
    return digest.hexdigest()[:16]


def cached_internvl_model(variant='a', seed=0, quantize_int8=True):
    """
    Return the directory of a tiny exported InternVL test model, building it only if missing.

    The directory is ``<export_onnx.cache_root()>/internvl-<variant>-<hash>``; the hash
    covers the tooling sources, so editing them rebuilds.  Builds go to a temporary
    directory that is renamed into place, so concurrent callers never see a half-written
    model.
    """
    root = export_onnx.cache_root()
    fingerprint = _source_fingerprint(variant, seed, quantize_int8)
    target = os.path.join(root, f'internvl-{variant}-{fingerprint}')
    if os.path.isdir(target):
        return target
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f'.build-internvl-{variant}-', dir=root)
    try:
        write_internvl_model(tmp, variant=variant, seed=seed, quantize_int8=quantize_int8)
        try:
            os.rename(tmp, target)
        except OSError:
            if not os.path.isdir(target):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def main(argv=None):
    """Command line: export a model directory, or build + export a tiny test model."""
    import argparse

    parser = argparse.ArgumentParser(description='Export InternVL to hub-style ONNX graphs.')
    parser.add_argument('model_dir', help='checkpoint directory (written with --tiny)')
    parser.add_argument('--tiny', metavar='VARIANT',
                        help='first build the tiny random-weight model VARIANT there')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--onnx-dir', help='output folder (default MODEL_DIR/onnx)')
    parser.add_argument('--no-int8', action='store_true', help='skip the *_int8 graphs')
    args = parser.parse_args(argv)
    if args.tiny:
        from .internvl_factory import build_tiny_internvl

        build_tiny_internvl(args.model_dir, variant=args.tiny, seed=args.seed)
    written = export_internvl_onnx(args.model_dir, args.onnx_dir, not args.no_int8)
    for path in written.values():
        print(path)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
