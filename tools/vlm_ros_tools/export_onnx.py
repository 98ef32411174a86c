"""
Export a SmolVLM checkpoint to ONNX exactly like the official hub exports.

The hub repositories (e.g. HuggingFaceTB/SmolVLM-256M-Instruct) ship three graphs under
``onnx/``:

``vision_encoder.onnx``
    ``pixel_values`` float32 [batch, num_images, 3, H, W] and ``pixel_attention_mask``
    bool [batch, num_images, H, W] -> ``image_features`` float32
    [num_real_images, image_seq_len, text_hidden]: the connector output that replaces the
    ``<image>`` token embeddings.  All-zero padding images are dropped first, as
    transformers' ``get_image_features`` does.
``embed_tokens.onnx``
    ``input_ids`` int64 [batch, seq] -> ``inputs_embeds`` float32 [batch, seq, hidden].
``decoder_model_merged.onnx``
    ``inputs_embeds``, ``attention_mask`` int64 [batch, past + seq], ``position_ids`` int64
    [batch, seq], ``past_key_values.{i}.key`` / ``.value`` float32
    [batch, kv_heads, past, head_dim] -> ``logits`` float32 [batch, seq, vocab],
    ``present.{i}.key`` / ``.value``.  One graph serves both the prompt (past length 0)
    and the one-token steps.

Dynamic int8 versions (``*_int8.onnx``) are made with onnxruntime's ``quantize_dynamic``.
The module also has ``write_test_model`` (build + export) and ``cached_test_model``
(the same, cached under ``.cache/test_models`` or ``$VLM_ROS_TEST_MODELS``, see
``model_cache.build_once``).
"""

import logging
import os
import warnings

import torch
from torch import nn

from . import model_cache
from .hub_files import quiet_transformers

GRAPH_NAMES = ('vision_encoder', 'embed_tokens', 'decoder_model_merged')
INT8_SUFFIX = '_int8'
OPSET = 17


class VisionEncoderGraph(nn.Module):
    """``pixel_values`` + ``pixel_attention_mask`` -> projected ``image_features``."""

    def __init__(self, model):
        """Wrap the vision tower and connector of a ``SmolVLMForConditionalGeneration``."""
        super().__init__()
        config = model.config
        self.vision = model.model.vision_model
        self.projection = model.model.connector.modality_projection
        self.patch_size = config.vision_config.patch_size
        self.side = config.vision_config.image_size // self.patch_size
        self.scale = config.scale_factor
        # Same float32 values transformers' embeddings compute at every call.
        self.register_buffer(
            'boundaries', torch.arange(1 / self.side, 1.0, 1 / self.side), persistent=False)

    def _position_ids(self, patch_mask):
        """Return NaViT-style position ids of the valid patches (bucketize, unrolled)."""
        nb_h = patch_mask[:, :, 0].sum(dim=1)
        nb_w = patch_mask[:, 0, :].sum(dim=1)
        step_h = 1.0 / nb_h
        step_w = 1.0 / nb_w
        h_idx = torch.cumsum(torch.ones_like(patch_mask[0, :, 0], dtype=torch.float32), 0) - 1
        w_idx = torch.cumsum(torch.ones_like(patch_mask[0, 0, :], dtype=torch.float32), 0) - 1
        frac_h = torch.clamp(h_idx[None, :] * step_h[:, None], max=1.0 - 1e-6)
        frac_w = torch.clamp(w_idx[None, :] * step_w[:, None], max=1.0 - 1e-6)
        # bucketize(x, boundaries, right=True) == number of boundaries <= x
        bucket_h = (self.boundaries <= frac_h[..., None]).sum(-1)
        bucket_w = (self.boundaries <= frac_w[..., None]).sum(-1)
        pos = (bucket_h[:, :, None] * self.side + bucket_w[:, None, :]).flatten(1)
        return torch.where(patch_mask.flatten(1), pos, torch.zeros_like(pos))

    def _pixel_shuffle(self, x):
        """Space-to-depth of the patch grid (``SmolVLMConnector.pixel_shuffle``)."""
        s, side = self.scale, self.side
        dim = x.shape[-1]
        x = x.reshape(-1, side, side // s, dim * s)
        x = x.permute(0, 2, 1, 3)
        x = x.reshape(-1, side // s, side // s, dim * s * s)
        x = x.permute(0, 2, 1, 3)
        return x.reshape(-1, (side // s) ** 2, dim * s * s)

    def forward(self, pixel_values, pixel_attention_mask):
        """Encode the real (not all-zero) images of the batch."""
        flat = pixel_values.flatten(0, 1)
        mask = pixel_attention_mask.flatten(0, 1)
        real = (flat != 0.0).flatten(1).any(dim=1)
        # If no image is real, keep the first one (as transformers does).
        first = torch.cumsum(torch.ones_like(real, dtype=torch.int64), 0) == 1
        real = real | (first & ~real.any())
        keep = torch.nonzero(real).squeeze(1)
        flat = flat.index_select(0, keep)
        mask = mask.index_select(0, keep)
        # A patch is valid if any of its pixels is (unfold + sum > 0 in transformers).
        patch_mask = nn.functional.max_pool2d(
            mask.unsqueeze(1).to(torch.float32), self.patch_size, self.patch_size)
        patch_mask = patch_mask.squeeze(1) > 0
        emb = self.vision.embeddings
        hidden = emb.patch_embedding(flat).flatten(2).transpose(1, 2)
        hidden = hidden + emb.position_embedding(self._position_ids(patch_mask))
        key_mask = patch_mask.flatten(1)[:, None, None, :]
        attn_mask = torch.where(key_mask, torch.zeros(1), torch.full((1,), torch.finfo(
            torch.float32).min))
        hidden = self.vision.encoder(inputs_embeds=hidden, attention_mask=attn_mask)
        hidden = self.vision.post_layernorm(hidden.last_hidden_state)
        return self.projection(self._pixel_shuffle(hidden))


class EmbedTokensGraph(nn.Module):
    """``input_ids`` -> ``inputs_embeds``."""

    def __init__(self, model):
        """Wrap the text embedding table."""
        super().__init__()
        self.embed = model.get_input_embeddings()

    def forward(self, input_ids):
        """Look the ids up."""
        return self.embed(input_ids)


class DecoderGraph(nn.Module):
    """Language model + lm_head with a flat KV cache (``decoder_model_merged``)."""

    def __init__(self, model):
        """Wrap the text model and head of a ``SmolVLMForConditionalGeneration``."""
        super().__init__()
        self.text_model = model.model.text_model
        self.lm_head = model.lm_head
        self.text_config = model.config.text_config
        self.num_layers = self.text_config.num_hidden_layers

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        """Run one prefill or decode step; return logits and the grown cache."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.text_config)
        for i, layer in enumerate(cache.layers):
            key, value = past[2 * i], past[2 * i + 1]
            layer.lazy_initialization(key, value)
            layer.keys, layer.values = key, value
        # Causal + padding mask, 4D additive; the query positions follow the past ones.
        ones_k = torch.ones_like(attention_mask[0])
        ones_q = torch.ones_like(position_ids[0])
        k_pos = torch.cumsum(ones_k, 0) - 1
        q_pos = torch.cumsum(ones_q, 0) - 1 + (ones_k.sum() - ones_q.sum())
        allowed = (k_pos[None, :] <= q_pos[:, None])[None, None]
        allowed = allowed & (attention_mask[:, None, None, :] > 0)
        mask = torch.where(allowed, torch.zeros(1), torch.full((1,), torch.finfo(
            torch.float32).min))
        out = self.text_model(
            inputs_embeds=inputs_embeds,
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        logits = self.lm_head(out.last_hidden_state)
        present = []
        for layer in cache.layers:
            present += [layer.keys, layer.values]
        return (logits, *present)


def load_model_for_export(model_dir):
    """Load a saved SmolVLM or InternVL in float32 with eager attention (exportable)."""
    from transformers import AutoModelForImageTextToText

    with quiet_transformers():
        model = AutoModelForImageTextToText.from_pretrained(
            model_dir, attn_implementation='eager', dtype=torch.float32, local_files_only=True)
    return model.eval()


def _export(module, args, path, input_names, output_names, dynamic_axes):
    """Export ``module`` with the TorchScript exporter (single file, no external data)."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        torch.onnx.export(
            module, args, path,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )


def export_vision_encoder(model, path):
    """Write ``vision_encoder.onnx``."""
    tile = model.config.vision_config.image_size
    pixel_values = torch.randn(1, 2, 3, tile, tile)
    mask = torch.ones(1, 2, tile, tile, dtype=torch.bool)
    _export(
        VisionEncoderGraph(model).eval(), (pixel_values, mask), path,
        ['pixel_values', 'pixel_attention_mask'], ['image_features'],
        {
            'pixel_values': {0: 'batch_size', 1: 'num_images', 3: 'height', 4: 'width'},
            'pixel_attention_mask': {0: 'batch_size', 1: 'num_images', 2: 'height', 3: 'width'},
            'image_features': {0: 'num_real_images'},
        })
    # The exporter loses the (static) token count per image; write it back.
    side = tile // model.config.vision_config.patch_size
    _set_output_dims(path, 'image_features', {
        1: (side // model.config.scale_factor) ** 2,
        2: model.config.text_config.hidden_size,
    })


def _set_output_dims(path, output_name, dims):
    """Set static sizes ``{axis: size}`` on a graph output of the ONNX file ``path``."""
    import onnx

    model = onnx.load(path)
    for output in model.graph.output:
        if output.name == output_name:
            shape = output.type.tensor_type.shape
            for axis, size in dims.items():
                shape.dim[axis].Clear()
                shape.dim[axis].dim_value = size
    onnx.save(model, path)


def export_embed_tokens(model, path):
    """Write ``embed_tokens.onnx``."""
    input_ids = torch.tensor([[1, 2, 3], [4, 5, 6]], dtype=torch.int64)
    _export(
        EmbedTokensGraph(model).eval(), (input_ids,), path,
        ['input_ids'], ['inputs_embeds'],
        {
            'input_ids': {0: 'batch_size', 1: 'sequence_length'},
            'inputs_embeds': {0: 'batch_size', 1: 'sequence_length'},
        })


def decoder_io_names(num_layers):
    """Return the decoder's (past input names, present output names)."""
    past, present = [], []
    for i in range(num_layers):
        for kind in ('key', 'value'):
            past.append(f'past_key_values.{i}.{kind}')
            present.append(f'present.{i}.{kind}')
    return past, present


def export_decoder(model, path):
    """Write ``decoder_model_merged.onnx``."""
    text = model.config.text_config
    head_dim = getattr(text, 'head_dim', None) or text.hidden_size // text.num_attention_heads
    batch, seq, past_len = 2, 3, 5
    embeds = torch.randn(batch, seq, text.hidden_size)
    attention_mask = torch.ones(batch, past_len + seq, dtype=torch.int64)
    position_ids = torch.arange(past_len, past_len + seq, dtype=torch.int64).repeat(batch, 1)
    past = []
    for _ in range(2 * text.num_hidden_layers):
        past.append(torch.randn(batch, text.num_key_value_heads, past_len, head_dim))
    past_names, present_names = decoder_io_names(text.num_hidden_layers)
    axes = {
        'inputs_embeds': {0: 'batch_size', 1: 'sequence_length'},
        'attention_mask': {0: 'batch_size', 1: 'total_sequence_length'},
        'position_ids': {0: 'batch_size', 1: 'sequence_length'},
        'logits': {0: 'batch_size', 1: 'sequence_length'},
    }
    for name in past_names:
        axes[name] = {0: 'batch_size', 2: 'past_sequence_length'}
    for name in present_names:
        axes[name] = {0: 'batch_size', 2: 'total_sequence_length'}
    _export(
        DecoderGraph(model).eval(), (embeds, attention_mask, position_ids, *past), path,
        ['inputs_embeds', 'attention_mask', 'position_ids'] + past_names,
        ['logits'] + present_names, axes)


def quantize_graph_int8(src, dst):
    """Write a dynamically quantised (int8 weights) copy of ``src`` to ``dst``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quiet the "consider pre-processing" advice
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            quantize_dynamic(src, dst, op_types_to_quantize=['MatMul', 'Gather'],
                             weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)


def export_graphs(model_dir, onnx_dir, exporters, quantize_int8=True):
    """
    Export the model in ``model_dir`` to ``onnx_dir`` (default ``model_dir/onnx``).

    ``exporters`` maps each of ``GRAPH_NAMES`` to the family's ``export(model, path)``;
    ``quantize_int8`` adds the ``*_int8`` versions (dynamic int8 weights).  Returns a dict
    mapping graph names (``vision_encoder``, ``vision_encoder_int8``, ...) to the files.
    """
    onnx_dir = onnx_dir or os.path.join(model_dir, 'onnx')
    os.makedirs(onnx_dir, exist_ok=True)
    model = load_model_for_export(model_dir)
    written = {}
    with torch.no_grad():
        for name in GRAPH_NAMES:
            path = os.path.join(onnx_dir, name + '.onnx')
            exporters[name](model, path)
            written[name] = path
    if quantize_int8:
        for name in GRAPH_NAMES:
            path = os.path.join(onnx_dir, name + INT8_SUFFIX + '.onnx')
            quantize_graph_int8(written[name], path)
            written[name + INT8_SUFFIX] = path
    return written


def export_smolvlm_onnx(model_dir, onnx_dir=None, quantize_int8=True):
    """Export the SmolVLM in ``model_dir`` (see ``export_graphs``); return name -> file."""
    return export_graphs(model_dir, onnx_dir, {
        'vision_encoder': export_vision_encoder,
        'embed_tokens': export_embed_tokens,
        'decoder_model_merged': export_decoder,
    }, quantize_int8)


def write_test_model(out_dir, variant='a', seed=0, quantize_int8=True):
    """Build a tiny SmolVLM in ``out_dir`` and export its ONNX graphs; return ``out_dir``."""
    from .smolvlm_factory import build_tiny_smolvlm

    build_tiny_smolvlm(out_dir, variant=variant, seed=seed)
    export_smolvlm_onnx(out_dir, quantize_int8=quantize_int8)
    return out_dir


def cached_test_model(variant='a', seed=0, quantize_int8=True):
    """
    Return the directory of a tiny exported test model, building it only if missing.

    The directory is ``<model_cache.cache_root()>/<variant>-<hash>``; the hash covers the
    tooling sources and library versions, so editing them rebuilds (``model_cache.build_once``:
    built in a temporary directory renamed into place).
    """
    return model_cache.build_once('smolvlm', variant, write_test_model, variant=variant,
                                  seed=seed, quantize_int8=bool(quantize_int8))


def command_line(argv, family, build_tiny, export):
    """
    Command line of an exporter: export a model directory, or build + export a tiny model.

    ``build_tiny(model_dir, variant=, seed=)`` is the family's factory and
    ``export(model_dir, onnx_dir, quantize_int8)`` its exporter.
    """
    import argparse

    parser = argparse.ArgumentParser(description=f'Export {family} to hub-style ONNX graphs.')
    parser.add_argument('model_dir', help='checkpoint directory (written with --tiny)')
    parser.add_argument('--tiny', metavar='VARIANT',
                        help='first build the tiny random-weight model VARIANT there')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--onnx-dir', help='output folder (default MODEL_DIR/onnx)')
    parser.add_argument('--no-int8', action='store_true', help='skip the *_int8 graphs')
    args = parser.parse_args(argv)
    if args.tiny:
        build_tiny(args.model_dir, variant=args.tiny, seed=args.seed)
    written = export(args.model_dir, args.onnx_dir, not args.no_int8)
    for path in written.values():
        print(path)
    return 0


def main(argv=None):
    """Command line: export a model directory, or build + export a tiny test model."""
    from .smolvlm_factory import build_tiny_smolvlm

    return command_line(argv, 'SmolVLM', build_tiny_smolvlm, export_smolvlm_onnx)


if __name__ == '__main__':
    raise SystemExit(main())
