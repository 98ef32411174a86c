"""
A random-weight Qwen2-VL at the published Qwen2-VL-2B-Instruct shapes, exported once and cached.

``SPEC`` holds the shapes of Qwen/Qwen2-VL-2B-Instruct as its hub ``config.json`` and
``preprocessor_config.json`` give them (written from the published files; nothing is
downloaded). With them the parameters add up to the checkpoint's 2,208,985,600 (its bfloat16
safetensors hold 4,417,971,200 bytes): 1.54B in the language model (embeddings tied with the
output), 665M in the vision tower and merger. Speed depends on shapes, not on trained values,
so the weights are transformers' own random initialisation.

The tokenizer is the project's tiny Qwen2-style BPE (``qwen2vl_factory``) with its base
vocabulary padded by never-merged tokens to Qwen2's 151643 entries, then Qwen2-VL's added
tokens in their order: ``<|endoftext|>`` is 151643, ``<|im_end|>`` 151645, ``<|image_pad|>``
151655, as in the real tokenizer, and the embedding has the published 151936 rows.

Why Qwen2-VL-2B and not Qwen2.5-VL-3B: the 3B is about 3.75B parameters (a 2048-wide,
36-layer language model of 3.09B and the 0.67B vision tower), 15 GB in float32. Writing and
exporting it would peak well over the 2B's 16 GB (see ``_in_child``) and the transformers
reference would need 15 GB on its own, too much for a 23 GB, 2-core machine; the 2B (8.8 GB
in float32) runs every path there.

``cached_qwen2vl_bench_model()`` builds the model once into
``.cache/bench_models/qwen2-vl-2b-<hash>`` (or ``$VLM_ROS_BENCH_MODELS``): the checkpoint
(float32 safetensors, for the transformers reference and the exporters), the language model
as a Q4_0 GGUF (``gguf_export``, architecture ``qwen2vl``), the vision tower and merger as an
f16 mmproj, and the project's ONNX vision encoder (``export_qwen2vl``'s graph) in fp32 and
int8. At these sizes the fp32 graph is over protobuf's 2 GB, so it is exported here with its
weights in ``vision_encoder.onnx.data`` beside it; the int8 one is a single file.
``tiny_qwen2vl_manifest()`` describes the tiny test model ``qwen2-a`` the same way.
"""

import gc
import hashlib
import json
import os
import sys
import time

from vlm_ros_bench import models

NAME = 'qwen2-vl-2b'
# Bump to rebuild the cached model (the hash also covers the exporters and library versions).
BUILD_VERSION = 4
GGUF_TYPE = 'q4_0'
MMPROJ_TYPE = 'f16'
SHARD_SIZE = '2GB'
QWEN2_BASE_VOCAB = 151643
PUBLISHED_PARAMS = 2208985600
"""Qwen2-VL-2B-Instruct's parameters: 4,417,971,200 bytes of bfloat16 safetensors / 2."""

SPEC = {
    'hub_id': 'Qwen/Qwen2-VL-2B-Instruct',
    'text': {'hidden_size': 1536, 'intermediate_size': 8960, 'num_hidden_layers': 28,
             'num_attention_heads': 12, 'num_key_value_heads': 2, 'vocab_size': 151936,
             'max_position_embeddings': 32768, 'rms_norm_eps': 1e-6, 'hidden_act': 'silu',
             'rope_theta': 1000000.0, 'mrope_section': [16, 24, 24],
             'use_sliding_window': False, 'sliding_window': 32768, 'max_window_layers': 28},
    'vision': {'depth': 32, 'embed_dim': 1280, 'mlp_ratio': 4, 'num_heads': 16,
               'in_channels': 3, 'hidden_size': 1536, 'patch_size': 14,
               'spatial_merge_size': 2, 'temporal_patch_size': 2, 'hidden_act': 'quick_gelu'},
    'tie_word_embeddings': True,
    # preprocessor_config.json: the pixel budget is 4 to 16384 merged 28x28 tokens.
    'min_pixels': 3136,
    'max_pixels': 12845056,
}


def _log(message):
    print(f'[bench] {message}', file=sys.stderr, flush=True)


# -- shapes ---------------------------------------------------------------------------------

def shape_summary(config):
    """Return the shapes the report needs, from a Qwen2-VL ``config.json`` dict."""
    text = {**{k: v for k, v in config.items() if not k.endswith('_config')},
            **(config.get('text_config') or {})}
    vision = config['vision_config']
    heads = int(text['num_attention_heads'])
    hidden = int(text['hidden_size'])
    return {
        'text': {'hidden_size': hidden, 'intermediate_size': int(text['intermediate_size']),
                 'num_hidden_layers': int(text['num_hidden_layers']),
                 'num_attention_heads': heads,
                 'num_key_value_heads': int(text.get('num_key_value_heads') or heads),
                 'head_dim': hidden // heads, 'vocab_size': int(text['vocab_size']),
                 'tie_word_embeddings': bool(config.get('tie_word_embeddings', False))},
        'vision': {'depth': int(vision['depth']), 'embed_dim': int(vision['embed_dim']),
                   'mlp_ratio': int(vision['mlp_ratio']), 'num_heads': int(vision['num_heads']),
                   'patch_size': int(vision['patch_size']),
                   'spatial_merge_size': int(vision['spatial_merge_size']),
                   'temporal_patch_size': int(vision['temporal_patch_size'])},
    }


def param_counts(shapes):
    """Count parameters per part: vision tower, merger, text layers, embedding, head."""
    t, v = shapes['text'], shapes['vision']
    h, ff, hd = t['hidden_size'], t['intermediate_size'], t['head_dim']
    q_out, kv_out = t['num_attention_heads'] * hd, t['num_key_value_heads'] * hd
    # Qwen2 attention: Q/K/V with biases, O without; SwiGLU MLP; two RMSNorms.
    layer = (h * q_out + q_out) + 2 * (h * kv_out + kv_out) + q_out * h + 3 * h * ff + 2 * h
    text_layers = t['num_hidden_layers'] * layer + h
    embedding = t['vocab_size'] * h
    head = 0 if t['tie_word_embeddings'] else embedding
    d, p = v['embed_dim'], v['patch_size']
    mlp = d * v['mlp_ratio']
    # Conv3d patch embedding without bias; blocks: 2 LayerNorms, fused qkv, proj, fc1, fc2.
    vision = 3 * v['temporal_patch_size'] * p * p * d
    vision += v['depth'] * (4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * mlp + mlp)
                            + (mlp * d + d))
    merged = d * v['spatial_merge_size'] ** 2
    # Merger: LayerNorm, then merged -> merged -> text width.
    connector = 2 * d + (merged * merged + merged) + (merged * h + h)
    return {'vision': vision, 'connector': connector, 'text_layers': text_layers,
            'embedding': embedding, 'lm_head_untied': head,
            'total': vision + connector + text_layers + embedding + head}


# -- tokenizer and checkpoint ---------------------------------------------------------------

def write_padded_tokenizer(out_dir):
    """
    Write the tiny Qwen2-style tokenizer with Qwen2-VL's vocabulary layout; return the ids.

    The trained tiny BPE (its merges decide how text splits) is padded with never-merged
    tokens to 151643 ids, then Qwen2-VL's 14 added tokens follow in the hub order.
    """
    from tokenizers import AddedToken, Tokenizer
    from vlm_ros_tools import qwen2vl_factory as qf, tiny_tokenizer

    trained = json.loads(qf.build_tokenizer().to_str())
    vocab = trained['model']['vocab']
    base = len(vocab)
    trained['added_tokens'] = [a for a in trained['added_tokens'] if a['id'] < base]
    for i, token in enumerate(models._filler_tokens(QWEN2_BASE_VOCAB - base, set(vocab))):
        vocab[token] = base + i
    tok = Tokenizer.from_str(json.dumps(trained))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in qf.ADDED_TOKENS])
    tiny_tokenizer.write_tokenizer_files(out_dir, tok, qf.tokenizer_config(tok),
                                         qf.special_tokens_map(), qf.CHAT_TEMPLATE,
                                         sort_keys=True)
    ids = {name: tok.token_to_id(token) for name, token in (
        ('endoftext_id', qf.ENDOFTEXT_TOKEN), ('im_end_id', qf.IM_END_TOKEN),
        ('vision_start_id', qf.VISION_START_TOKEN), ('vision_end_id', qf.VISION_END_TOKEN),
        ('image_token_id', qf.IMAGE_PAD_TOKEN), ('video_token_id', qf.VIDEO_PAD_TOKEN))}
    if ids['endoftext_id'] != QWEN2_BASE_VOCAB or ids['video_token_id'] != 151656:
        raise RuntimeError(f'padded tokenizer has the wrong special ids: {ids}')
    ids['vocab_size'] = tok.get_vocab_size(with_added_tokens=True)
    return ids


def make_config(spec, ids):
    """Return the ``Qwen2VLConfig`` of ``spec`` with the tokenizer's special ids."""
    from transformers import Qwen2VLConfig

    text = dict(spec['text'])
    rope_theta = text.pop('rope_theta')
    mrope = text.pop('mrope_section')
    if text['vocab_size'] < ids['vocab_size']:
        raise RuntimeError(f'the tokenizer has {ids["vocab_size"]} ids, the embedding '
                           f'{text["vocab_size"]} rows')
    text.update({
        'rope_parameters': {'rope_type': 'default', 'rope_theta': rope_theta,
                            'mrope_section': list(mrope)},
        'bos_token_id': ids['endoftext_id'], 'eos_token_id': ids['im_end_id'],
        'tie_word_embeddings': spec['tie_word_embeddings'],
    })
    return Qwen2VLConfig(vision_config=dict(spec['vision']), text_config=text,
                         image_token_id=ids['image_token_id'],
                         video_token_id=ids['video_token_id'],
                         vision_start_token_id=ids['vision_start_id'],
                         vision_end_token_id=ids['vision_end_id'],
                         tie_word_embeddings=spec['tie_word_embeddings'])


def preprocessor_config(spec):
    """Return the hub's ``preprocessor_config.json`` (Qwen2VLImageProcessor)."""
    from vlm_ros_tools import qwen2vl_factory as qf

    out = qf.preprocessor_config('qwen2-a')
    out.update(min_pixels=spec['min_pixels'], max_pixels=spec['max_pixels'],
               patch_size=spec['vision']['patch_size'],
               merge_size=spec['vision']['spatial_merge_size'],
               temporal_patch_size=spec['vision']['temporal_patch_size'])
    return out


def write_checkpoint(out_dir, spec=SPEC, seed=0):
    """
    Write config, tokenizer and random float32 weights in the hub layout; return counts.

    As ``hub_files.save_checkpoint`` writes the tiny models, but in 2 GB shards: the GGUF
    exporter reads a safetensors file through a mapping that stays resident until the file
    is done, so one 8.8 GB file would add its size to the copies (export peak 17.3 GB in
    one file, ~10 GB in shards).
    """
    import torch
    from transformers import GenerationConfig, Qwen2VLForConditionalGeneration
    from vlm_ros_tools.hub_files import quiet_transformers, write_json

    os.makedirs(out_dir, exist_ok=True)
    ids = write_padded_tokenizer(out_dir)
    config = make_config(spec, ids)
    torch.manual_seed(seed)
    with quiet_transformers():
        model = Qwen2VLForConditionalGeneration(config).to(torch.float32).eval()
        counted = sum(p.numel() for p in model.parameters())
        model.generation_config = GenerationConfig(
            bos_token_id=ids['endoftext_id'],
            eos_token_id=[ids['im_end_id'], ids['endoftext_id']],
            pad_token_id=ids['endoftext_id'])
        model.save_pretrained(out_dir, max_shard_size=SHARD_SIZE)
    del model
    gc.collect()
    path = os.path.join(out_dir, 'config.json')
    with open(path, encoding='utf-8') as f:
        cfg = json.load(f)
    # The legacy keys every hub config carries (what save_checkpoint adds).
    cfg['torch_dtype'] = cfg.get('dtype', 'float32')
    cfg['text_config']['rope_theta'] = cfg['text_config']['rope_parameters']['rope_theta']
    write_json(path, cfg)
    write_json(os.path.join(out_dir, 'preprocessor_config.json'), preprocessor_config(spec))
    write_json(os.path.join(out_dir, 'processor_config.json'),
               {'processor_class': 'Qwen2VLProcessor'})
    return counted


# -- ONNX vision encoder --------------------------------------------------------------------

def load_vision_tower(model_dir):
    """
    Return a stand-in for the full model with only the vision tower loaded (float32).

    ``export_qwen2vl.VisionEncoderGraph`` reads ``model.model.visual`` and ``model.config``:
    loading the tower alone keeps the 6 GB language model out of memory while exporting.
    """
    from types import SimpleNamespace

    import torch
    from safetensors import safe_open
    from transformers import Qwen2VLConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import \
        Qwen2VisionTransformerPretrainedModel
    from vlm_ros_tools.hub_files import quiet_transformers

    config = Qwen2VLConfig.from_pretrained(model_dir)
    with quiet_transformers():
        visual = Qwen2VisionTransformerPretrainedModel._from_config(
            config.vision_config, dtype=torch.float32)
    state = {}
    names = sorted(n for n in os.listdir(model_dir)
                   if n.startswith('model') and n.endswith('.safetensors'))
    for name in names:
        with safe_open(os.path.join(model_dir, name), framework='pt') as f:
            for key in f.keys():
                for prefix in ('model.visual.', 'visual.'):
                    if key.startswith(prefix):
                        state[key[len(prefix):]] = f.get_tensor(key)
    missing, unexpected = visual.load_state_dict(state, strict=False)
    # The rotary table is computed, not stored.
    missing = [k for k in missing if 'rotary' not in k]
    if missing or unexpected:
        raise RuntimeError(f'vision tower weights: missing {missing}, unexpected {unexpected}')
    return SimpleNamespace(model=SimpleNamespace(visual=visual.eval()), config=config)


def export_vision_onnx(model_dir):
    """
    Export the project's fp32 ONNX vision encoder of a (large) Qwen2-VL; return its path.

    ``export_qwen2vl``'s exporter on the vision tower alone (``load_vision_tower``); at the
    2B size its weights go to ``vision_encoder.onnx.data``. The int8 graph is a separate
    build step (its own process: quantising peaks far above the export).
    """
    import torch
    from vlm_ros_tools import export_qwen2vl

    onnx_dir = os.path.join(model_dir, 'onnx')
    os.makedirs(onnx_dir, exist_ok=True)
    path = os.path.join(onnx_dir, 'vision_encoder.onnx')
    model = load_vision_tower(model_dir)
    with torch.no_grad():
        export_qwen2vl.export_vision_encoder(model, path)
    return path


# -- manifest -------------------------------------------------------------------------------

def files_layout():
    """Return the model's files, relative to its folder."""
    return {
        'gguf': {GGUF_TYPE: f'gguf/model-{GGUF_TYPE}.gguf'},
        'mmproj': {'type': MMPROJ_TYPE, 'path': f'gguf/mmproj-{MMPROJ_TYPE}.gguf'},
        'onnx': {'fp32': {'vision': 'onnx/vision_encoder.onnx'},
                 'int8': {'vision': 'onnx/vision_encoder_int8.onnx'}},
    }


def _file_mb(path):
    """Return the MiB of ``path`` plus the external data an ONNX graph keeps beside it."""
    total = os.path.getsize(path)
    data = path + '.data'
    if os.path.isfile(data):
        total += os.path.getsize(data)
    return total / 2 ** 20


def manifest(name, model_dir, files, hub_id, build_s):
    """Describe a model folder whose files exist (paths may be absolute)."""
    with open(os.path.join(model_dir, 'config.json'), encoding='utf-8') as f:
        shapes = shape_summary(json.load(f))
    with open(os.path.join(model_dir, 'preprocessor_config.json'), encoding='utf-8') as f:
        pre = json.load(f)

    def full(rel):
        return rel if os.path.isabs(rel) else os.path.join(model_dir, rel)

    sizes = {'gguf': {t: models.gguf_weight_bytes(full(p)) for t, p in files['gguf'].items()},
             'mmproj_mb': _file_mb(full(files['mmproj']['path'])),
             'onnx_mb': {v: _file_mb(full(g['vision'])) for v, g in files['onnx'].items()},
             'checkpoint_mb': sum(os.path.getsize(os.path.join(model_dir, n))
                                  for n in os.listdir(model_dir)
                                  if n.endswith('.safetensors')) / 2 ** 20}
    return {'name': name, 'hub_id': hub_id, 'random_weights': True, 'model_dir': model_dir,
            'shapes': shapes, 'params': param_counts(shapes),
            'pixels': {'min': int(pre['min_pixels']), 'max': int(pre['max_pixels'])},
            'files': files, 'sizes': sizes, 'build_s': build_s}


def _checkpoint(out_dir):
    """Write the checkpoint and check it has the published parameter count."""
    counted = write_checkpoint(out_dir)
    if counted != PUBLISHED_PARAMS:
        raise RuntimeError(f'{counted} parameters, the published model has {PUBLISHED_PARAMS}')


def _in_child(fn, *args, **kwargs):
    """
    Run ``fn(*args, **kwargs)`` in a fresh process and wait for it.

    Each step holds gigabytes the allocator keeps after it returns (one process for all:
    peak 18.8 GB, the int8 quantisation on top of what the exports left), so each starts
    from nothing; the peak is then the int8 quantisation's own (~16 GB).
    """
    import multiprocessing

    child = multiprocessing.get_context('spawn').Process(target=fn, args=args, kwargs=kwargs)
    child.start()
    child.join()
    if child.exitcode != 0:
        raise RuntimeError(f'{fn.__name__} failed in its process (exit code {child.exitcode})')


def build_model(out_dir):
    """Write, export and describe the benchmark model in ``out_dir``; return the manifest."""
    from vlm_ros_tools.export_onnx import INT8_SUFFIX, quantize_graph_int8
    from vlm_ros_tools.gguf_export import export_mmproj_gguf, export_text_gguf

    files = files_layout()
    label = SPEC['hub_id'].split('/')[-1] + ' (random weights)'
    onnx_fp32 = os.path.join(out_dir, files['onnx']['fp32']['vision'])
    onnx_int8 = os.path.join(out_dir, files['onnx']['int8']['vision'])
    if onnx_int8 != onnx_fp32[:-len('.onnx')] + INT8_SUFFIX + '.onnx':
        raise RuntimeError('the int8 file name does not follow export_onnx.INT8_SUFFIX')
    steps = (
        ('checkpoint_s', 'writing the random-weight checkpoint (float32, 8.8 GB)',
         _checkpoint, (out_dir,), {}),
        (f'gguf_{GGUF_TYPE}_s', f'exporting the language model as GGUF {GGUF_TYPE}',
         export_text_gguf, (out_dir, os.path.join(out_dir, files['gguf'][GGUF_TYPE])),
         {'arch': 'qwen2vl', 'ftype': GGUF_TYPE, 'pre_tokenizer': 'qwen2', 'name': label}),
        ('mmproj_s', f'exporting the vision tower and merger as an mmproj ({MMPROJ_TYPE})',
         export_mmproj_gguf, (out_dir, os.path.join(out_dir, files['mmproj']['path'])),
         {'ftype': MMPROJ_TYPE}),
        ('onnx_fp32_s', 'exporting the ONNX vision encoder (fp32, export_qwen2vl graph)',
         export_vision_onnx, (out_dir,), {}),
        ('onnx_int8_s', 'quantising the ONNX vision encoder to int8',
         quantize_graph_int8, (onnx_fp32, onnx_int8), {}),
    )
    timings = {}
    for key, message, fn, args, kwargs in steps:
        _log(f'{NAME}: {message}')
        t = time.perf_counter()
        _in_child(fn, *args, **kwargs)
        timings[key] = time.perf_counter() - t
    out = manifest(NAME, out_dir, files, SPEC['hub_id'], timings)
    models._write_json(os.path.join(out_dir, models.MANIFEST), out)
    return out


def fingerprint():
    """Hash of the spec, the tooling sources and the library versions."""
    from importlib import metadata

    digest = hashlib.sha256()
    digest.update(json.dumps(SPEC, sort_keys=True).encode())
    digest.update(f'build={BUILD_VERSION};'.encode())
    tools = os.path.join(models.REPO, 'tools', 'vlm_ros_tools')
    for source in ('tiny_tokenizer.py', 'internvl_factory.py', 'qwen2vl_factory.py',
                   'hub_files.py', 'export_onnx.py', 'export_qwen2vl.py', 'gguf_export.py'):
        with open(os.path.join(tools, source), 'rb') as f:
            digest.update(f.read())
    for package in ('torch', 'transformers', 'onnx', 'onnxruntime', 'gguf', 'tokenizers'):
        try:
            digest.update(f'{package}={metadata.version(package)};'.encode())
        except metadata.PackageNotFoundError:
            digest.update(f'{package}=none;'.encode())
    return digest.hexdigest()[:16]


def model_path():
    """Return the cache directory the benchmark model has (or will have)."""
    return os.path.join(models.cache_root(), f'{NAME}-{fingerprint()}')


def cached_qwen2vl_bench_model(rebuild=False):
    """Return the manifest of the benchmark model, building it (many minutes) when needed."""
    return models.cached_build(NAME, model_path(), build_model, rebuild)


def tiny_qwen2vl_manifest():
    """
    Return a manifest for the tiny test model ``qwen2-a`` and its cached files.

    Its ONNX folder (``cached_qwen2vl_onnx_model``, the same seeded checkpoint) serves as the
    model folder; the GGUF files come from the test cache, the projector in float32.
    """
    from vlm_ros_tools.export_qwen2vl import cached_qwen2vl_onnx_model
    from vlm_ros_tools.gguf_export import cached_qwen2vl_gguf, cached_qwen2vl_mmproj

    model_dir = cached_qwen2vl_onnx_model('qwen2-a')
    files = files_layout()
    files['gguf'] = {GGUF_TYPE: cached_qwen2vl_gguf('qwen2-a', GGUF_TYPE)}
    files['mmproj'] = {'type': 'f32', 'path': cached_qwen2vl_mmproj('qwen2-a', 'f32')}
    return manifest('tiny-qwen2-a', model_dir, files, 'tiny test model qwen2-a (vlm_ros_tools)',
                    {})


def main(argv=None):
    """Command line: build (or rebuild) the Qwen2-VL benchmark model."""
    import argparse

    parser = argparse.ArgumentParser(description='Build the Qwen2-VL benchmark model.')
    parser.add_argument('--rebuild', action='store_true')
    args = parser.parse_args(argv)
    print(cached_qwen2vl_bench_model(rebuild=args.rebuild)['model_dir'])
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
