"""
Random-weight models at the published SmolVLM2 sizes, exported once and cached.

``SPECS`` holds the shapes of HuggingFaceTB/SmolVLM2-256M-Video-Instruct and
SmolVLM2-500M-Video-Instruct as their hub ``config.json`` / ``preprocessor_config.json`` /
``processor_config.json`` give them (written from the published files; nothing is
downloaded). Speed depends on shapes, not on trained values, so the weights are transformers'
own random initialisation (the lm_head is untied, as in the checkpoints). The tokenizer is
the project's tiny BPE tokenizer with its base vocabulary padded to SmolLM2's 49152 entries
and the special tokens appended in SmolVLM2's order, so ``<image>`` is 49190 and the
vocabulary has the real 49280 ids.

``cached_bench_model(name)`` builds a model once into ``.cache/bench_models/<name>-<hash>``
(or ``$VLM_ROS_BENCH_MODELS``) through the project's exporters -- ONNX fp32 and int8
(``export_onnx``), GGUF f16 / Q8_0 / Q4_0 language models and f16 mmproj projectors
(``gguf_export``) -- and returns its manifest: files, parameter counts and the bytes a
decode step reads. ``tiny_manifest()`` does the same for the tiny test model ``a``.
"""

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CACHE_ENV = 'VLM_ROS_BENCH_MODELS'
# Bump to rebuild every cached benchmark model (the hash also covers the exporters).
BUILD_VERSION = 1
MANIFEST = 'bench_manifest.json'
GGUF_TYPES = ('f16', 'q8_0', 'q4_0')
MMPROJ_TYPE = 'f16'
SMOLLM2_BASE_VOCAB = 49152
# SmolVLM2's tokenizer: <|reserved_special_token_N|> between <image> and <end_of_utterance>.
RESERVED_TOKENS = 88

_VISION = {'hidden_size': 768, 'intermediate_size': 3072, 'num_hidden_layers': 12,
           'num_attention_heads': 12, 'image_size': 512, 'patch_size': 16,
           'layer_norm_eps': 1e-6}
SPECS = {
    'smolvlm2-256m': {
        'hub_id': 'HuggingFaceTB/SmolVLM2-256M-Video-Instruct',
        'text': {'hidden_size': 576, 'intermediate_size': 1536, 'num_hidden_layers': 30,
                 'num_attention_heads': 9, 'num_key_value_heads': 3, 'head_dim': 64,
                 'rope_theta': 100000.0, 'max_position_embeddings': 8192,
                 'rms_norm_eps': 1e-5, 'vocab_size': 49280},
        'vision': _VISION,
        'scale_factor': 4,
        'longest_edge': 2048,
        # SmolLM2 ties its embeddings, the VLM checkpoints do not: only a separate lm_head
        # makes the published totals (256.5M and 507M parameters) add up.
        'tie_word_embeddings': False,
    },
    'smolvlm2-500m': {
        'hub_id': 'HuggingFaceTB/SmolVLM2-500M-Video-Instruct',
        'text': {'hidden_size': 960, 'intermediate_size': 2560, 'num_hidden_layers': 32,
                 'num_attention_heads': 15, 'num_key_value_heads': 5, 'head_dim': 64,
                 'rope_theta': 100000.0, 'max_position_embeddings': 8192,
                 'rms_norm_eps': 1e-5, 'vocab_size': 49280},
        'vision': _VISION,
        'scale_factor': 4,
        'longest_edge': 2048,
        'tie_word_embeddings': False,
    },
}


def _log(message):
    print(f'[bench] {message}', file=sys.stderr, flush=True)


def cache_root():
    """Return the benchmark model cache (``$VLM_ROS_BENCH_MODELS`` or .cache/bench_models)."""
    root = os.environ.get(CACHE_ENV)
    return os.path.abspath(root) if root else os.path.join(REPO, '.cache', 'bench_models')


def shape_summary(config):
    """Return the shapes the roofline needs, from a hub-style ``config.json`` dict."""
    text = dict(config['text_config'])
    vision = dict(config['vision_config'])
    heads = int(text['num_attention_heads'])
    hidden = int(text['hidden_size'])
    tied = bool(config.get('tie_word_embeddings', text.get('tie_word_embeddings', False)))
    side = int(vision['image_size']) // int(vision['patch_size'])
    scale = int(config.get('scale_factor', 2))
    return {
        'text': {
            'hidden_size': hidden,
            'intermediate_size': int(text['intermediate_size']),
            'num_hidden_layers': int(text['num_hidden_layers']),
            'num_attention_heads': heads,
            'num_key_value_heads': int(text.get('num_key_value_heads') or heads),
            'head_dim': int(text.get('head_dim') or hidden // heads),
            'vocab_size': int(text['vocab_size']),
            'tie_word_embeddings': tied,
        },
        'vision': {
            'hidden_size': int(vision['hidden_size']),
            'intermediate_size': int(vision['intermediate_size']),
            'num_hidden_layers': int(vision['num_hidden_layers']),
            'num_attention_heads': int(vision['num_attention_heads']),
            'image_size': int(vision['image_size']),
            'patch_size': int(vision['patch_size']),
        },
        'scale_factor': scale,
        'image_seq_len': (side * side) // (scale * scale),
    }


def param_counts(shapes):
    """Count parameters per part (vision tower, connector, text layers, embedding, head)."""
    t, v = shapes['text'], shapes['vision']
    h, ff, hd = t['hidden_size'], t['intermediate_size'], t['head_dim']
    q_out, kv_out = t['num_attention_heads'] * hd, t['num_key_value_heads'] * hd
    layer = h * q_out + 2 * h * kv_out + q_out * h + 3 * h * ff + 2 * h
    text_layers = t['num_hidden_layers'] * layer + h
    embedding = t['vocab_size'] * h
    head = 0 if t['tie_word_embeddings'] else embedding
    d, vff, p = v['hidden_size'], v['intermediate_size'], v['patch_size']
    patches = (v['image_size'] // p) ** 2
    vision = 3 * p * p * d + d + patches * d
    vision += v['num_hidden_layers'] * (4 * (d * d + d) + d * vff + vff + vff * d + d + 4 * d)
    vision += 2 * d
    connector = d * shapes['scale_factor'] ** 2 * h
    return {'vision': vision, 'connector': connector, 'text_layers': text_layers,
            'embedding': embedding, 'lm_head_untied': head,
            'total': vision + connector + text_layers + embedding + head}


# -- tokenizer ------------------------------------------------------------------------------

def _filler_tokens(count, taken):
    """Return ``count`` distinct byte-level BPE token strings not in ``taken``."""
    letters = 'abcdefghijklmnopqrstuvwxyz'
    out = []
    i = 0
    while len(out) < count:
        n, word = i, ''
        while True:
            word = letters[n % 26] + word
            n //= 26
            if n == 0:
                break
        token = '\u0120zq' + word  # 'Ġ' is the byte-level space
        if token not in taken:
            out.append(token)
        i += 1
    return out


def write_padded_tokenizer(out_dir):
    """
    Write the tiny tokenizer with SmolVLM2's vocabulary layout; return the special ids.

    The trained tiny BPE (its merges decide how text splits) is padded with never-merged
    tokens up to 49152 ids, then SmolVLM2's added tokens follow in the hub order
    (``<global-img>``, 36 tile markers, ``<fake_token_around_image>``, ``<image>``, 88
    reserved tokens, ``<end_of_utterance>``), for 49280 ids as in the real tokenizer.
    """
    from tokenizers import AddedToken, Tokenizer
    from vlm_ros_tools import tiny_tokenizer as tt

    trained = json.loads(tt.build_tiny_tokenizer().to_str())
    vocab = trained['model']['vocab']
    base = len(vocab)
    trained['added_tokens'] = [a for a in trained['added_tokens'] if a['id'] < base]
    for i, token in enumerate(_filler_tokens(SMOLLM2_BASE_VOCAB - base, set(vocab))):
        vocab[token] = base + i
    tok = Tokenizer.from_str(json.dumps(trained))
    added = [tt.GLOBAL_IMAGE_TOKEN]
    added += [f'<row_{r}_col_{c}>' for r in range(1, 7) for c in range(1, 7)]
    added += [tt.FAKE_IMAGE_TOKEN, tt.IMAGE_TOKEN]
    added += [f'<|reserved_special_token_{i}|>' for i in range(RESERVED_TOKENS)]
    added.append(tt.END_OF_UTTERANCE_TOKEN)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, 'tokenizer.json'))
    config = tt.tokenizer_config(tok)
    for token in added:
        entry = tt._token_entry(token)
        entry['special'] = True
        config['added_tokens_decoder'][str(tok.token_to_id(token))] = entry
    tt._write_json(os.path.join(out_dir, 'tokenizer_config.json'), config)
    tt._write_json(os.path.join(out_dir, 'special_tokens_map.json'), tt.special_tokens_map())
    tt._write_json(os.path.join(out_dir, 'chat_template.json'),
                   {'chat_template': tt.CHAT_TEMPLATE})
    return tt.token_ids(tok)


# -- checkpoint -----------------------------------------------------------------------------

def _write_json(path, data):
    with open(path, 'w', encoding='utf-8') as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write('\n')


def write_checkpoint(name, out_dir, seed=0):
    """Write config, tokenizer and random float32 weights of ``name`` in the hub layout."""
    import torch
    from transformers import GenerationConfig, SmolVLMConfig, SmolVLMForConditionalGeneration
    from vlm_ros_tools.smolvlm_factory import quiet_transformers

    spec = SPECS[name]
    ids = write_padded_tokenizer(out_dir)
    text = dict(spec['text'])
    if ids['vocab_size'] != text['vocab_size']:
        raise RuntimeError(f'padded tokenizer has {ids["vocab_size"]} ids, the config '
                           f'{text["vocab_size"]}')
    rope_theta = text.pop('rope_theta')
    text.update({
        'model_type': 'llama',
        'rope_parameters': {'rope_type': 'default', 'rope_theta': rope_theta},
        'pad_token_id': ids['pad_token_id'],
        'bos_token_id': ids['bos_token_id'],
        'eos_token_id': ids['eos_token_id'],
        'tie_word_embeddings': spec['tie_word_embeddings'],
    })
    config = SmolVLMConfig(vision_config=dict(spec['vision']), text_config=text,
                           scale_factor=spec['scale_factor'],
                           image_token_id=ids['image_token_id'],
                           tie_word_embeddings=spec['tie_word_embeddings'],
                           pad_token_id=ids['pad_token_id'], use_cache=True)
    torch.manual_seed(seed)
    with quiet_transformers():
        model = SmolVLMForConditionalGeneration(config).to(torch.float32).eval()
        model.generation_config = GenerationConfig(
            bos_token_id=ids['bos_token_id'],
            eos_token_id=[ids['im_end_token_id'], ids['eos_token_id']],
            pad_token_id=ids['pad_token_id'])
        model.save_pretrained(out_dir)
    del model
    path = os.path.join(out_dir, 'config.json')
    with open(path, encoding='utf-8') as f:
        cfg = json.load(f)
    if '_pad_token_id' in cfg:
        cfg['pad_token_id'] = cfg.pop('_pad_token_id')
    cfg['torch_dtype'] = 'float32'
    cfg['text_config']['rope_theta'] = rope_theta
    tile = spec['vision']['image_size']
    cfg['vision_config']['max_image_size'] = {'longest_edge': tile}
    cfg['vision_config']['size'] = {'longest_edge': spec['longest_edge']}
    cfg['vocab_size'] = spec['text']['vocab_size']
    _write_json(path, cfg)
    _write_json(os.path.join(out_dir, 'preprocessor_config.json'), {
        'do_convert_rgb': True, 'do_image_splitting': True, 'do_normalize': True,
        'do_pad': True, 'do_rescale': True, 'do_resize': True,
        'image_mean': [0.5, 0.5, 0.5], 'image_processor_type': 'SmolVLMImageProcessor',
        'image_std': [0.5, 0.5, 0.5], 'max_image_size': {'longest_edge': tile},
        'processor_class': 'SmolVLMProcessor', 'resample': 1,
        'rescale_factor': 1.0 / 255.0, 'size': {'longest_edge': spec['longest_edge']},
        'video_sampling': {'fps': 1, 'max_frames': 64, 'video_size': {'longest_edge': tile}},
    })
    seq_len = shape_summary(cfg)['image_seq_len']
    _write_json(os.path.join(out_dir, 'processor_config.json'),
                {'image_seq_len': seq_len, 'processor_class': 'SmolVLMProcessor'})
    return out_dir


# -- weight bytes ---------------------------------------------------------------------------

def onnx_weight_bytes(path):
    """Return ``(total initializer bytes, rows of the largest 2-D initializer)``."""
    import onnx
    from onnx import helper

    model = onnx.load(os.fspath(path), load_external_data=False)
    total = 0
    biggest = (0, 0)
    for init in model.graph.initializer:
        count = 1
        for dim in init.dims:
            count *= dim
        size = helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        nbytes = len(init.raw_data) if init.raw_data else count * size
        total += nbytes
        if len(init.dims) == 2 and nbytes > biggest[0]:
            biggest = (nbytes, int(init.dims[0]))
    return total, biggest[1]


def gguf_weight_bytes(path):
    """
    Return the bytes of a GGUF language model and what one decode step reads.

    Per token llama.cpp reads every layer tensor, the output norm and the output projection
    (``output.weight``, or ``token_embd.weight`` when the embeddings are tied), plus one row
    of ``token_embd`` for the input token.
    """
    from gguf import GGUFReader

    reader = GGUFReader(os.fspath(path))
    sizes = {t.name: (int(t.n_bytes), [int(x) for x in t.shape]) for t in reader.tensors}
    total = sum(n for n, _ in sizes.values())
    embd_bytes, embd_shape = sizes['token_embd.weight']
    rows = embd_shape[-1] if len(embd_shape) > 1 else 1  # ggml: shape[0] is the row length
    tied = 'output.weight' not in sizes
    per_token = total - embd_bytes + (embd_bytes if tied else 0) + embd_bytes // max(rows, 1)
    return {'file_bytes': os.path.getsize(path), 'tensor_bytes': total,
            'decode_bytes_per_token': per_token, 'tied_output': tied,
            'token_embd_bytes': embd_bytes}


def onnx_bytes_entry(vision, embed, decoder):
    """Return the byte counts of one ONNX precision (the decoder reads all its weights)."""
    dec_total, _ = onnx_weight_bytes(decoder)
    emb_total, emb_rows = onnx_weight_bytes(embed)
    vis_total, _ = onnx_weight_bytes(vision)
    return {'vision_weight_bytes': vis_total, 'embed_weight_bytes': emb_total,
            'decoder_weight_bytes': dec_total,
            'decode_bytes_per_token': dec_total + emb_total // max(emb_rows, 1),
            'file_bytes': sum(os.path.getsize(p) for p in (vision, embed, decoder))}


def _manifest(name, model_dir, files, hub_id, random_weights, build_s):
    """Build the manifest dict of a model directory whose files exist."""
    with open(os.path.join(model_dir, 'config.json'), encoding='utf-8') as f:
        shapes = shape_summary(json.load(f))
    with open(os.path.join(model_dir, 'preprocessor_config.json'), encoding='utf-8') as f:
        pre = json.load(f)

    def full(rel):
        return rel if os.path.isabs(rel) else os.path.join(model_dir, rel)

    onnx_bytes = {v: onnx_bytes_entry(full(g['vision']), full(g['embed']), full(g['decoder']))
                  for v, g in files['onnx'].items()}
    gguf_bytes = {t: gguf_weight_bytes(full(p)) for t, p in files['gguf'].items()}
    mmproj_bytes = {k: os.path.getsize(full(p)) for k, p in files['mmproj'].items()
                    if k != 'type'}
    return {
        'name': name, 'hub_id': hub_id, 'random_weights': random_weights,
        'model_dir': model_dir, 'shapes': shapes, 'params': param_counts(shapes),
        'tile_size': int(pre['max_image_size']['longest_edge']),
        'longest_edge': int(pre['size']['longest_edge']),
        'files': files,
        'bytes': {'onnx': onnx_bytes, 'gguf': gguf_bytes, 'mmproj': mmproj_bytes},
        'build_s': build_s,
    }


def _files_layout():
    onnx_files = {}
    for variant, suffix in (('fp32', ''), ('int8', '_int8')):
        onnx_files[variant] = {'vision': f'onnx/vision_encoder{suffix}.onnx',
                               'embed': f'onnx/embed_tokens{suffix}.onnx',
                               'decoder': f'onnx/decoder_model_merged{suffix}.onnx'}
    return {
        'onnx': onnx_files,
        'gguf': {t: f'gguf/model-{t}.gguf' for t in GGUF_TYPES},
        'mmproj': {'type': MMPROJ_TYPE, 'split': f'gguf/mmproj-{MMPROJ_TYPE}.gguf',
                   'nosplit': f'gguf/mmproj-{MMPROJ_TYPE}-tile.gguf'},
    }


def build_model(name, out_dir):
    """Write, export and describe model ``name`` in ``out_dir``; return the manifest."""
    from vlm_ros_tools.export_onnx import export_smolvlm_onnx
    from vlm_ros_tools.gguf_export import export_mmproj_gguf, export_text_gguf

    spec = SPECS[name]
    files = _files_layout()
    steps = {}
    t = time.perf_counter()
    _log(f'{name}: writing the random-weight checkpoint')
    write_checkpoint(name, out_dir)
    steps['checkpoint_s'] = time.perf_counter() - t
    t = time.perf_counter()
    _log(f'{name}: exporting ONNX fp32 + int8 (export_onnx)')
    export_smolvlm_onnx(out_dir, quantize_int8=True)
    steps['onnx_s'] = time.perf_counter() - t
    label = spec['hub_id'].split('/')[-1] + ' (random weights)'
    for ftype, rel in files['gguf'].items():
        t = time.perf_counter()
        _log(f'{name}: exporting the language model as GGUF {ftype} (gguf_export)')
        export_text_gguf(out_dir, os.path.join(out_dir, rel), arch='llama', ftype=ftype,
                         name=label)
        steps[f'gguf_{ftype}_s'] = time.perf_counter() - t
    t = time.perf_counter()
    _log(f'{name}: exporting the mmproj projector ({MMPROJ_TYPE}, split and tile-only)')
    mm = files['mmproj']
    export_mmproj_gguf(out_dir, os.path.join(out_dir, mm['split']), ftype=MMPROJ_TYPE)
    export_mmproj_gguf(out_dir, os.path.join(out_dir, mm['nosplit']), ftype=MMPROJ_TYPE,
                       preproc_image_size=spec['vision']['image_size'])
    steps['mmproj_s'] = time.perf_counter() - t
    manifest = _manifest(name, out_dir, files, spec['hub_id'], True, steps)
    _write_json(os.path.join(out_dir, MANIFEST), manifest)
    return manifest


def fingerprint(name):
    """Hash of the spec, the exporters' sources and the library versions."""
    from importlib import metadata

    digest = hashlib.sha256()
    digest.update(json.dumps(SPECS[name], sort_keys=True).encode())
    digest.update(f'build={BUILD_VERSION};'.encode())
    tools = os.path.join(REPO, 'tools', 'vlm_ros_tools')
    for source in ('tiny_tokenizer.py', 'smolvlm_factory.py', 'hub_files.py',
                   'export_onnx.py', 'gguf_export.py'):
        with open(os.path.join(tools, source), 'rb') as f:
            digest.update(f.read())
    for package in ('torch', 'transformers', 'onnx', 'onnxruntime', 'gguf', 'tokenizers'):
        try:
            digest.update(f'{package}={metadata.version(package)};'.encode())
        except metadata.PackageNotFoundError:
            digest.update(f'{package}=none;'.encode())
    return digest.hexdigest()[:16]


def model_path(name):
    """Return the cache directory model ``name`` has (or will have)."""
    if name not in SPECS:
        raise KeyError(f'unknown benchmark model {name!r} (known: {", ".join(SPECS)})')
    return os.path.join(cache_root(), f'{name}-{fingerprint(name)}')


def load_manifest(model_dir):
    """Read the manifest of a built model directory (None when not built)."""
    path = os.path.join(model_dir, MANIFEST)
    if not os.path.isfile(path):
        return None
    with open(path, encoding='utf-8') as f:
        return json.load(f)


def cached_bench_model(name, rebuild=False):
    """Return the manifest of model ``name``, building it (minutes) when not cached."""
    return cached_build(name, model_path(name), lambda out: build_model(name, out), rebuild)


def cached_build(name, target, build, rebuild=False):
    """
    Return the manifest in ``target``, first running ``build(folder)`` when there is none.

    The build goes to a temporary folder beside ``target`` and is renamed into place, so an
    interrupted build leaves nothing that looks complete; older builds of ``name`` (other
    hashes) are removed afterwards.
    """
    if os.path.isdir(target) and not rebuild:
        manifest = load_manifest(target)
        if manifest is not None:
            return manifest
    root = cache_root()
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f'.build-{name}-', dir=root)
    try:
        build(tmp)
        # The manifest names its own folder: rewrite it for the final location.
        manifest = load_manifest(tmp)
        manifest['model_dir'] = target
        _write_json(os.path.join(tmp, MANIFEST), manifest)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.rename(tmp, target)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    for stale in os.listdir(root):
        if stale.startswith(f'{name}-') and os.path.join(root, stale) != target:
            _log(f'removing the outdated build {stale}')
            shutil.rmtree(os.path.join(root, stale), ignore_errors=True)
    return load_manifest(target)


def tiny_manifest():
    """Return a manifest for the tiny test model ``a`` and its cached GGUF files."""
    from vlm_ros_tools.export_onnx import cached_test_model
    from vlm_ros_tools.gguf_export import cached_gguf, cached_mmproj

    model_dir = cached_test_model('a')
    with open(os.path.join(model_dir, 'preprocessor_config.json'), encoding='utf-8') as f:
        tile = int(json.load(f)['max_image_size']['longest_edge'])
    files = _files_layout()
    files['gguf'] = {t: cached_gguf('a', t) for t in GGUF_TYPES}
    # The test cache's projectors are float32 (one file fewer to export there).
    files['mmproj'] = {'type': 'f32', 'split': cached_mmproj('a', 'f32'),
                       'nosplit': cached_mmproj('a', 'f32', preproc_image_size=tile)}
    return _manifest('tiny-a', model_dir, files, 'tiny test model a (vlm_ros_tools)', True,
                     {})


def main(argv=None):
    """Command line: build (or rebuild) benchmark models."""
    import argparse

    parser = argparse.ArgumentParser(description='Build the benchmark models.')
    parser.add_argument('models', nargs='*', help=f'default: all of {", ".join(SPECS)}')
    parser.add_argument('--rebuild', action='store_true')
    args = parser.parse_args(argv)
    unknown = sorted(set(args.models) - set(SPECS))
    if unknown:
        parser.error(f'unknown models {unknown} (known: {", ".join(SPECS)})')
    for name in args.models or list(SPECS):
        manifest = cached_bench_model(name, rebuild=args.rebuild)
        print(manifest['model_dir'])
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
