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

Plus ``*_int8.onnx`` (dynamic int8 weights).  The token embedder, decoder, quantiser, model
loader and command line are ``export_onnx``'s, applied to InternVL's language model;
``cached_internvl_model`` caches a built + exported tiny model like
``export_onnx.cached_test_model`` (``model_cache.build_once``).
"""

import types

import torch
from torch import nn

from . import export_onnx, model_cache

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
    """Export the InternVL in ``model_dir`` (see ``export_onnx.export_graphs``)."""
    return export_onnx.export_graphs(model_dir, onnx_dir, {
        'vision_encoder': export_vision_encoder,
        'embed_tokens': export_embed_tokens,
        'decoder_model_merged': export_decoder,
    }, quantize_int8)


def write_internvl_model(out_dir, variant='a', seed=0, quantize_int8=True):
    """Build a tiny InternVL in ``out_dir`` and export its ONNX graphs; return ``out_dir``."""
    from .internvl_factory import build_tiny_internvl

    build_tiny_internvl(out_dir, variant=variant, seed=seed)
    export_internvl_onnx(out_dir, quantize_int8=quantize_int8)
    return out_dir


def cached_internvl_model(variant='a', seed=0, quantize_int8=True):
    """
    Return the directory of a tiny exported InternVL test model, building it only if missing.

    The directory is ``<model_cache.cache_root()>/internvl-<variant>-<hash>``; the hash covers
    the tooling sources and library versions, so editing them rebuilds
    (``model_cache.build_once``: built in a temporary directory renamed into place).
    """
    return model_cache.build_once('internvl', f'internvl-{variant}', write_internvl_model,
                                  variant=variant, seed=seed, quantize_int8=bool(quantize_int8))


def main(argv=None):
    """Command line: export a model directory, or build + export a tiny test model."""
    from .internvl_factory import build_tiny_internvl

    return export_onnx.command_line(argv, 'InternVL', build_tiny_internvl, export_internvl_onnx)


if __name__ == '__main__':
    raise SystemExit(main())
