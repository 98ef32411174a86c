"""
Write GGUF files for llama.cpp from the PyTorch weights of (tiny) vision-language checkpoints.

``export_text_gguf`` writes the language model the way llama.cpp's ``convert_hf_to_gguf.py``
does for ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``Qwen2VLForConditionalGeneration``
(tensor names, the rotary permutation of Q and K for the ``llama`` architecture, the M-RoPE
sections of ``qwen2vl``, hyperparameters and a GPT-2 style BPE vocabulary in the metadata),
so that llama.cpp and transformers can be compared on the same weights.
``export_mmproj_gguf`` writes the vision tower and connector as a ``clip`` projector file
(``--mmproj`` in the converter): projector type ``idefics3`` for SmolVLM, ``qwen2vl_merger``
for Qwen2-VL and ``qwen2.5vl_merger`` for Qwen2.5-VL. ``cached_gguf`` and ``cached_mmproj``
export the tiny test models of ``export_onnx.cached_test_model`` once,
``cached_qwen2vl_gguf`` and ``cached_qwen2vl_mmproj`` those of ``qwen2vl_factory``.
"""

import hashlib
import json
import os
import shutil
import tempfile

import numpy as np

FTYPES = ('f32', 'f16', 'q8_0', 'q4_0')
ARCHS = ('llama', 'qwen2', 'qwen2vl')
# Architectures with qwen2's tensor layout: HF's rotary layout kept, Q/K/V biases.
_QWEN2_LAYOUT = ('qwen2', 'qwen2vl')
# Pre-tokenizer for the SmolLM2 / SmolVLM vocabulary: digits one by one, then the GPT-2
# regex -- exactly what the tiny tokenizer.json does (checked in the tests).
DEFAULT_PRE_TOKENIZER = 'smollm'
# Prefixes under which multimodal checkpoints keep their language model.
_TEXT_PREFIXES = ('model.text_model.', 'model.language_model.', 'language_model.model.',
                  'model.')
_LM_HEAD_NAMES = ('lm_head.weight', 'language_model.lm_head.weight')
_VISION_PREFIXES = ('model.vision_model.', 'vision_model.', 'model.vision_tower.')
# Qwen2-VL's vision tower: ``visual.`` in hub checkpoints, ``model.visual.`` in transformers 5.
_QWEN2VL_VISION_PREFIXES = ('model.visual.', 'visual.')
# config.json ``model_type`` -> llama.cpp projector type (``gguf.VisionProjectorType``).
QWEN2VL_PROJECTORS = {'qwen2_vl': 'qwen2vl_merger', 'qwen2_5_vl': 'qwen2.5vl_merger'}
# Qwen2VLImageProcessor's defaults (OpenAI CLIP), for a loaded model without its folder.
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
_CONNECTOR = ('model.connector.modality_projection.proj.weight',
              'connector.modality_projection.proj.weight')


def _gguf():
    import gguf  # deferred: a test/dev dependency only
    return gguf


def _qtype(ftype):
    gguf = _gguf()
    if ftype not in FTYPES:
        raise ValueError(f'unknown ftype {ftype!r} (known: {", ".join(FTYPES)})')
    return {
        'f32': (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
        'f16': (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
        'q8_0': (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
        'q4_0': (gguf.GGMLQuantizationType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
    }[ftype]


class _Source:
    """Config, float32 weights and tokenizer folder of a checkpoint or a loaded model."""

    def __init__(self, model_dir_or_hf_model, tokenizer_dir=None):
        if isinstance(model_dir_or_hf_model, (str, os.PathLike)):
            self.model_dir = os.fspath(model_dir_or_hf_model)
            with open(os.path.join(self.model_dir, 'config.json'), encoding='utf-8') as f:
                self.config = json.load(f)
            self.weights = _read_safetensors(self.model_dir)
        else:
            model = model_dir_or_hf_model
            self.config = model.config.to_dict()
            self.model_dir = getattr(model.config, '_name_or_path', '') or None
            self.weights = {name: t.detach().to('cpu').float().numpy()
                            for name, t in model.state_dict().items()}
        self.tokenizer_dir = os.fspath(tokenizer_dir) if tokenizer_dir else self.model_dir
        self.text = dict(self.config.get('text_config') or self.config)

    def name(self, fallback):
        """Return ``general.name``: the checkpoint folder's name, else ``fallback``."""
        return os.path.basename((self.model_dir or '').rstrip('/\\')) or fallback

    def text_weights(self):
        """Language-model weights keyed by names relative to the text model."""
        out = {}
        for prefix in _TEXT_PREFIXES:
            out = {k[len(prefix):]: v for k, v in self.weights.items() if k.startswith(prefix)}
            if 'embed_tokens.weight' in out:
                break
        if 'embed_tokens.weight' not in out:
            raise ValueError('no language model weights (embed_tokens) in the checkpoint')
        for name in _LM_HEAD_NAMES:
            if name in self.weights:
                out['lm_head.weight'] = self.weights[name]
        return out

    def vision_weights(self, prefixes=_VISION_PREFIXES):
        """Vision tower weights keyed by names relative to the vision model."""
        for prefix in prefixes:
            out = {k[len(prefix):]: v for k, v in self.weights.items() if k.startswith(prefix)}
            if out:
                return out
        raise ValueError('no vision tower weights in the checkpoint')


def _read_safetensors(model_dir):
    from safetensors.numpy import load_file

    names = sorted(n for n in os.listdir(model_dir)
                   if n.startswith('model') and n.endswith('.safetensors'))
    if not names:
        raise FileNotFoundError(f'no model*.safetensors in {model_dir}')
    weights = {}
    for name in names:
        for key, value in load_file(os.path.join(model_dir, name)).items():
            weights[key] = np.asarray(value, dtype=np.float32)
    return weights


def permute_for_rope(weights, n_head, n_head_kv=None):
    """
    Reorder Q/K rows from HF's half-split rotary layout to llama.cpp's interleaved one.

    The same transform ``convert_hf_to_gguf.py`` applies to ``q_proj``/``k_proj`` (weights
    and biases) of ``LlamaForCausalLM``; ``n_head_kv`` is used for K with grouped queries.
    """
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    shape = weights.shape
    return (weights.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:])
            .swapaxes(1, 2).reshape(shape))


def _rope_theta(text):
    params = text.get('rope_parameters') or text.get('rope_scaling') or {}
    return float(params.get('rope_theta', text.get('rope_theta', 10000.0)))


def _mrope_sections(config):
    """
    Return the M-RoPE sections of a Qwen2-VL config, padded to llama.cpp's four entries.

    transformers 5 saves them in ``text_config.rope_parameters``; the hub configs of the
    official checkpoints keep them in a ``rope_scaling`` dict, top level or in ``text_config``.
    """
    text = config.get('text_config') or {}
    for holder in (text, config):
        for key in ('rope_parameters', 'rope_scaling'):
            section = (holder.get(key) or {}).get('mrope_section')
            if section:
                section = [int(x) for x in section]
                if len(section) > 4:
                    raise ValueError(f'mrope_section {section} has more than 4 entries')
                return section + [0] * (4 - len(section))
    raise ValueError('no mrope_section in the config (rope_parameters / rope_scaling)')


def _tensor_data(array, qtype):
    """Return ``(data, raw_dtype)`` for the writer: 1-D stays float32, like the converter."""
    gguf = _gguf()
    array = np.ascontiguousarray(array, dtype=np.float32)
    if array.ndim <= 1 or qtype == gguf.GGMLQuantizationType.F32:
        return array, None
    if qtype == gguf.GGMLQuantizationType.F16:
        return array.astype(np.float16), None
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if array.shape[-1] % block:
        # llama.cpp quantises whole rows of blocks; fall back as llama-quantize does.
        return array.astype(np.float16), None
    return gguf.quants.quantize(array, qtype), qtype


def _add_tensor(writer, name, array, qtype):
    data, raw_dtype = _tensor_data(array, qtype)
    writer.add_tensor(name, data, raw_dtype=raw_dtype)


def export_text_gguf(model_dir_or_hf_model, out_path, arch='llama', ftype='f32',
                     tokenizer_dir=None, pre_tokenizer=DEFAULT_PRE_TOKENIZER, name=None):
    """
    Write the language model of a checkpoint (folder or loaded HF model) as a GGUF file.

    ``arch`` ``llama`` permutes Q/K for llama.cpp's rotary layout; ``qwen2`` keeps HF's
    layout (llama.cpp runs it with NEOX rope) and writes Q/K/V biases (zero when the source
    has none), so the same weights exercise both code paths. ``qwen2vl`` is the language
    model of Qwen2-VL / Qwen2.5-VL: qwen2's layout plus the M-RoPE sections
    (``qwen2vl.rope.dimension_sections``). ``ftype`` is ``f32``, ``f16``, ``q8_0`` or
    ``q4_0`` (2-D weights; norms stay float32). Returns ``out_path``.
    """
    gguf = _gguf()
    if arch not in ARCHS:
        raise ValueError(f'unknown arch {arch!r} (known: {", ".join(ARCHS)})')
    qtype, file_type = _qtype(ftype)
    src = _Source(model_dir_or_hf_model, tokenizer_dir)
    text = src.text
    if arch == 'qwen2vl':
        # Hub configs of the official checkpoints keep the text hyperparameters at the top.
        text = {**{k: v for k, v in src.config.items() if not k.endswith('_config')}, **text}
    weights = src.text_weights()
    n_head = int(text['num_attention_heads'])
    n_head_kv = int(text.get('num_key_value_heads') or n_head)
    hidden = int(text['hidden_size'])
    head_dim = int(text.get('head_dim') or hidden // n_head)
    n_layers = int(text['num_hidden_layers'])
    vocab = int(weights['embed_tokens.weight'].shape[0])

    writer = gguf.GGUFWriter(None, arch)
    writer.add_type('model')
    writer.add_name(name or src.name(f'tiny-{arch}'))
    writer.add_context_length(int(text.get('max_position_embeddings', 2048)))
    writer.add_embedding_length(hidden)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(int(text['intermediate_size']))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_freq_base(_rope_theta(text))
    writer.add_layer_norm_rms_eps(float(text.get('rms_norm_eps', 1e-6)))
    writer.add_rope_dimension_count(head_dim)
    if arch == 'qwen2vl':
        writer.add_rope_dimension_sections(_mrope_sections(src.config))
    if head_dim * n_head != hidden:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(vocab)
    writer.add_file_type(file_type)
    if qtype not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_vocab(writer, src, vocab, pre_tokenizer)

    _add_tensor(writer, 'token_embd.weight', weights['embed_tokens.weight'], qtype)
    for i in range(n_layers):
        p, b = f'layers.{i}.', f'blk.{i}.'
        for hf, ours in (('q', 'attn_q'), ('k', 'attn_k'), ('v', 'attn_v')):
            for kind in ('weight', 'bias'):
                tensor = weights.get(f'{p}self_attn.{hf}_proj.{kind}')
                if tensor is None:
                    if kind == 'bias' and arch in _QWEN2_LAYOUT:
                        rows = weights[f'{p}self_attn.{hf}_proj.weight'].shape[0]
                        tensor = np.zeros(rows, dtype=np.float32)
                    else:
                        continue
                if arch == 'llama' and hf in ('q', 'k'):
                    tensor = permute_for_rope(tensor, n_head, n_head if hf == 'q' else n_head_kv)
                _add_tensor(writer, f'{b}{ours}.{kind}', tensor, qtype)
        _add_tensor(writer, f'{b}attn_output.weight', weights[f'{p}self_attn.o_proj.weight'],
                    qtype)
        if f'{p}self_attn.o_proj.bias' in weights:
            _add_tensor(writer, f'{b}attn_output.bias', weights[f'{p}self_attn.o_proj.bias'],
                        qtype)
        for hf, ours in (('gate', 'ffn_gate'), ('up', 'ffn_up'), ('down', 'ffn_down')):
            _add_tensor(writer, f'{b}{ours}.weight', weights[f'{p}mlp.{hf}_proj.weight'], qtype)
        _add_tensor(writer, f'{b}attn_norm.weight', weights[f'{p}input_layernorm.weight'],
                    qtype)
        _add_tensor(writer, f'{b}ffn_norm.weight',
                    weights[f'{p}post_attention_layernorm.weight'], qtype)
    _add_tensor(writer, 'output_norm.weight', weights['norm.weight'], qtype)
    tied = src.config.get('tie_word_embeddings', text.get('tie_word_embeddings', False))
    if 'lm_head.weight' in weights and not tied:
        _add_tensor(writer, 'output.weight', weights['lm_head.weight'], qtype)
    _write(writer, out_path)
    return out_path


def _write(writer, out_path):
    """Write to a temporary file and rename, so readers never see half a file."""
    out_dir = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.gguf-', suffix='.tmp', dir=out_dir)
    os.close(fd)
    try:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _looks_special(token):
    """Tell added tokens the converter marks CONTROL even when not flagged special."""
    return token in ('<pad>', '<mask>') or (token.startswith('<|') and token.endswith('|>'))


def _add_vocab(writer, src, vocab_size, pre_tokenizer):
    """GPT-2 BPE vocabulary from tokenizer.json, as the converter's ``_set_vocab_gpt2``."""
    gguf = _gguf()
    if not src.tokenizer_dir:
        raise ValueError('the tokenizer folder is unknown: pass tokenizer_dir')
    with open(os.path.join(src.tokenizer_dir, 'tokenizer.json'), encoding='utf-8') as f:
        tok = json.load(f)
    model = tok['model']
    if model.get('type') != 'BPE':
        raise ValueError(f'only BPE tokenizers are supported, not {model.get("type")}')
    by_id = {int(i): t for t, i in model['vocab'].items()}
    added = {int(a['id']): a for a in tok.get('added_tokens', [])}
    for i, entry in added.items():
        by_id[i] = entry['content']
    if max(by_id) >= vocab_size:
        raise ValueError(f'tokenizer has id {max(by_id)} but the embedding has {vocab_size} '
                         'rows')
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f'[PAD{i}]')
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            special = added[i].get('special') or _looks_special(by_id[i])
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else ' '.join(m) for m in model.get('merges', [])]
    writer.add_tokenizer_model('gpt2')
    writer.add_tokenizer_pre(pre_tokenizer)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)

    config = {}
    path = os.path.join(src.tokenizer_dir, 'tokenizer_config.json')
    if os.path.isfile(path):
        with open(path, encoding='utf-8') as f:
            config = json.load(f)
    ids = {t: i for i, t in enumerate(tokens)}

    def special_id(key):
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get('content')
        return ids.get(value) if value else None

    for key, add in (('bos_token', writer.add_bos_token_id),
                     ('eos_token', writer.add_eos_token_id),
                     ('unk_token', writer.add_unk_token_id),
                     ('pad_token', writer.add_pad_token_id)):
        token_id = special_id(key)
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(bool(config.get('add_bos_token', False)))
    writer.add_add_eos_token(bool(config.get('add_eos_token', False)))
    template = config.get('chat_template')
    path = os.path.join(src.tokenizer_dir, 'chat_template.json')
    if not template and os.path.isfile(path):
        with open(path, encoding='utf-8') as f:
            template = json.load(f).get('chat_template')
    if isinstance(template, str) and template:
        writer.add_chat_template(template)


def export_mmproj_gguf(model_dir_or_hf_model, out_path, ftype='f32', preproc_image_size=None):
    """
    Write the vision tower and connector of a checkpoint as an mmproj GGUF; return out_path.

    Follows ``convert_hf_to_gguf.py --mmproj``, chosen by the config's ``model_type``:
    SmolVLM / Idefics3 get projector type ``idefics3`` (tensors ``v.*`` and
    ``mm.model.fc``), Qwen2-VL ``qwen2vl_merger`` and Qwen2.5-VL ``qwen2.5vl_merger``
    (``_write_qwen2vl_mmproj``). ``preproc_image_size`` (Idefics3 only) overrides the longest
    edge llama.cpp resizes to before tiling (default: the preprocessor's
    ``size.longest_edge``; the tile size disables splitting).
    """
    src = _Source(model_dir_or_hf_model)
    if src.config.get('model_type') in QWEN2VL_PROJECTORS:
        if preproc_image_size is not None:
            raise ValueError('preproc_image_size applies to Idefics3 projectors only')
        _write_qwen2vl_mmproj(src, out_path, ftype)
        return out_path
    gguf = _gguf()
    qtype, file_type = _qtype(ftype)
    cfg = src.config
    vision = dict(cfg['vision_config'])
    text = src.text
    weights = src.vision_weights()
    connector = next((src.weights[n] for n in _CONNECTOR if n in src.weights), None)
    if connector is None:
        raise ValueError('no connector (modality_projection) weights in the checkpoint')
    preprocessor = _preprocessor_config(src)
    if preproc_image_size is None:
        preproc_image_size = (preprocessor.get('size') or {}).get('longest_edge',
                                                                  vision['image_size'])
    n_layers = int(vision['num_hidden_layers'])

    writer = gguf.GGUFWriter(None, 'clip')
    writer.add_type(gguf.GGUFType.MMPROJ)
    writer.add_name(src.name('tiny-smolvlm') + '-mmproj')
    writer.add_file_type(file_type)
    writer.add_clip_has_vision_encoder(True)
    writer.add_vision_projection_dim(int(text['hidden_size']))
    writer.add_vision_image_size(int(vision['image_size']))
    writer.add_vision_patch_size(int(vision['patch_size']))
    writer.add_vision_embedding_length(int(vision['hidden_size']))
    writer.add_vision_feed_forward_length(int(vision['intermediate_size']))
    writer.add_vision_block_count(n_layers)
    writer.add_vision_head_count(int(vision['num_attention_heads']))
    mean = preprocessor.get('image_mean', [0.5, 0.5, 0.5])
    std = preprocessor.get('image_std', [0.5, 0.5, 0.5])
    writer.add_vision_image_mean([float(x) for x in mean])
    writer.add_vision_image_std([float(x) for x in std])
    writer.add_clip_projector_type(gguf.VisionProjectorType.IDEFICS3)
    writer.add_vision_attention_layernorm_eps(float(vision.get('layer_norm_eps', 1e-5)))
    writer.add_vision_projector_scale_factor(int(cfg.get('scale_factor', 2)))
    writer.add_vision_use_gelu(True)
    writer.add_vision_preproc_image_size(int(preproc_image_size))

    f32 = gguf.GGMLQuantizationType.F32
    emb = 'embeddings.'
    # The converter forces the embeddings to float32 (the conv kernel has 8-wide rows).
    _add_tensor(writer, 'v.patch_embd.weight', weights[emb + 'patch_embedding.weight'], f32)
    _add_tensor(writer, 'v.patch_embd.bias', weights[emb + 'patch_embedding.bias'], f32)
    _add_tensor(writer, 'v.position_embd.weight', weights[emb + 'position_embedding.weight'],
                f32)
    names = (('self_attn.q_proj', 'attn_q'), ('self_attn.k_proj', 'attn_k'),
             ('self_attn.v_proj', 'attn_v'), ('self_attn.out_proj', 'attn_out'),
             ('layer_norm1', 'ln1'), ('layer_norm2', 'ln2'),
             ('mlp.fc1', 'ffn_up'), ('mlp.fc2', 'ffn_down'))
    for i in range(n_layers):
        for hf, ours in names:
            for kind in ('weight', 'bias'):
                key = f'encoder.layers.{i}.{hf}.{kind}'
                if key in weights:
                    _add_tensor(writer, f'v.blk.{i}.{ours}.{kind}', weights[key], qtype)
    _add_tensor(writer, 'v.post_ln.weight', weights['post_layernorm.weight'], f32)
    _add_tensor(writer, 'v.post_ln.bias', weights['post_layernorm.bias'], f32)
    _add_tensor(writer, 'mm.model.fc.weight', connector, qtype)
    _write(writer, out_path)
    return out_path


def _preprocessor_config(src):
    """Return the checkpoint's preprocessor_config.json ({} for a model without a folder)."""
    path = os.path.join(src.model_dir, 'preprocessor_config.json') if src.model_dir else None
    if not path or not os.path.isfile(path):
        return {}
    with open(path, encoding='utf-8') as f:
        return json.load(f)


def _n_wa_pattern(fullatt_block_indexes):
    """
    Return llama.cpp's window-attention period for Qwen2.5-VL's full-attention blocks.

    libmtmd runs block ``i`` with full attention when ``(i + 1) % n_wa_pattern == 0``, so
    only evenly spaced indexes starting at ``n_wa_pattern - 1`` can be expressed; the
    converter checks the spacing the same way.
    """
    indexes = [int(i) for i in fullatt_block_indexes or ()]
    if not indexes:
        raise ValueError('Qwen2.5-VL needs vision_config.fullatt_block_indexes')
    period = indexes[0] + 1
    if any(b - a != period for a, b in zip(indexes, indexes[1:], strict=False)):
        raise ValueError(f'fullatt_block_indexes {indexes} are not every {period}th block: '
                         'llama.cpp cannot express them')
    return period


def _write_qwen2vl_mmproj(src, out_path, ftype):
    """
    Write the vision tower and merger of a Qwen2-VL / Qwen2.5-VL checkpoint (``src``).

    The layout of ``convert_hf_to_gguf.py --mmproj`` (``Qwen2VLVisionModel``): the Conv3d
    patch embedding as two 2-D kernels ``v.patch_embd.weight`` / ``v.patch_embd.weight.1``
    (one per temporal slice), each fused ``qkv`` split into ``attn_q`` / ``attn_k`` /
    ``attn_v``, ``norm1`` / ``norm2`` as ``ln1`` / ``ln2``, the MLP as ``ffn_up`` /
    ``ffn_down`` (plus ``ffn_gate`` for Qwen2.5-VL's gated SiLU MLP), the merger's ``ln_q``
    as ``v.post_ln`` and its ``mlp.0`` / ``mlp.2`` as ``mm.0`` / ``mm.2``. Norms are
    LayerNorms (weight and bias) for Qwen2-VL, RMSNorms (weight only) for Qwen2.5-VL;
    libmtmd picks the kind from the projector type.

    Like the converter this writes no attention window size: libmtmd runs Qwen2.5-VL's
    window layers with the released models' 112-pixel windows whatever
    ``vision_config.window_size`` says, nor image pixel limits: libmtmd allows 8 to 4096
    merged tokens for these projectors unless its context parameters say otherwise.
    """
    gguf = _gguf()
    qtype, file_type = _qtype(ftype)
    cfg = src.config
    projector = QWEN2VL_PROJECTORS[cfg['model_type']]
    vision = dict(cfg['vision_config'])
    text = {**cfg, **(cfg.get('text_config') or {})}
    weights = src.vision_weights(_QWEN2VL_VISION_PREFIXES)
    preprocessor = _preprocessor_config(src)
    n_layers = int(vision['depth'])
    if 'embed_dim' in vision:
        # Qwen2-VL's vision_config names its width embed_dim, and its hidden_size is the
        # merger's output; the converter renames them this way (and so writes the merger
        # width as the feed-forward length, which libmtmd does not read).
        width, ffn = int(vision['embed_dim']), int(vision['hidden_size'])
    else:
        width, ffn = int(vision['hidden_size']), int(vision['intermediate_size'])

    writer = gguf.GGUFWriter(None, 'clip')
    writer.add_type(gguf.GGUFType.MMPROJ)
    writer.add_name(src.name(f'tiny-{cfg["model_type"]}') + '-mmproj')
    writer.add_file_type(file_type)
    writer.add_clip_has_vision_encoder(True)
    writer.add_vision_projection_dim(int(text['hidden_size']))
    # No fixed input size (the images keep their aspect); 560 is the converter's default.
    writer.add_vision_image_size(int(vision.get('image_size', 560)))
    writer.add_vision_patch_size(int(vision['patch_size']))
    writer.add_vision_embedding_length(width)
    writer.add_vision_feed_forward_length(ffn)
    writer.add_vision_block_count(n_layers)
    writer.add_vision_head_count(int(vision['num_heads']))
    writer.add_vision_image_mean([float(x) for x in preprocessor.get('image_mean', _CLIP_MEAN)])
    writer.add_vision_image_std([float(x) for x in preprocessor.get('image_std', _CLIP_STD)])
    writer.add_clip_projector_type(projector)
    if projector == 'qwen2.5vl_merger':
        writer.add_vision_use_silu(True)
        writer.add_vision_n_wa_pattern(_n_wa_pattern(vision.get('fullatt_block_indexes')))
    # The converter reads the top-level rms_norm_eps, else HF's hard-coded 1e-6 (what both
    # towers' LayerNorm / RMSNorm use).
    writer.add_vision_attention_layernorm_eps(float(cfg.get('rms_norm_eps', 1e-6)))

    patch = weights['patch_embed.proj.weight']
    if patch.ndim != 5 or patch.shape[2] != 2:
        raise ValueError(f'expected a Conv3d patch kernel with 2 time steps, got {patch.shape}')
    # The patch kernels stay float32 (float16 in an f16 file), as the converter forces them.
    patch_type = (gguf.GGMLQuantizationType.F16 if ftype == 'f16'
                  else gguf.GGMLQuantizationType.F32)
    _add_tensor(writer, 'v.patch_embd.weight', patch[:, :, 0], patch_type)
    _add_tensor(writer, 'v.patch_embd.weight.1', patch[:, :, 1], patch_type)
    layer_names = (('norm1', 'ln1'), ('norm2', 'ln2'), ('attn.proj', 'attn_out'),
                   ('mlp.fc1', 'ffn_up'), ('mlp.fc2', 'ffn_down'),
                   ('mlp.gate_proj', 'ffn_gate'), ('mlp.up_proj', 'ffn_up'),
                   ('mlp.down_proj', 'ffn_down'))
    for i in range(n_layers):
        p, b = f'blocks.{i}.', f'v.blk.{i}.'
        for kind in ('weight', 'bias'):
            qkv = weights.get(f'{p}attn.qkv.{kind}')
            if qkv is None:
                continue
            if qkv.shape[0] % 3:
                raise ValueError(f'{p}attn.qkv.{kind} has {qkv.shape[0]} rows, not 3 x width')
            for name, part in zip(('attn_q', 'attn_k', 'attn_v'), np.split(qkv, 3), strict=True):
                _add_tensor(writer, f'{b}{name}.{kind}', part, qtype)
        for hf, ours in layer_names:
            for kind in ('weight', 'bias'):
                key = f'{p}{hf}.{kind}'
                if key in weights:
                    _add_tensor(writer, f'{b}{ours}.{kind}', weights[key], qtype)
    for hf, ours in (('merger.ln_q', 'v.post_ln'), ('merger.mlp.0', 'mm.0'),
                     ('merger.mlp.2', 'mm.2')):
        for kind in ('weight', 'bias'):
            key = f'{hf}.{kind}'
            if key in weights:
                _add_tensor(writer, f'{ours}.{kind}', weights[key], qtype)
    _write(writer, out_path)
    return out_path


def _gguf_dir(model_dir):
    """
    Return ``model_dir/gguf``, emptied when this exporter or gguf changed since last time.

    The test model folder's own hash covers the model tooling but not this module, so the
    folder keeps a stamp of the exporter that wrote its files.
    """
    gguf = _gguf()
    digest = hashlib.sha256()
    with open(os.path.abspath(__file__), 'rb') as f:
        digest.update(f.read())
    digest.update(getattr(gguf, '__version__', '').encode())
    stamp = digest.hexdigest()[:16]
    out = os.path.join(model_dir, 'gguf')
    stamp_path = os.path.join(out, 'exporter.stamp')
    try:
        with open(stamp_path, encoding='utf-8') as f:
            current = f.read().strip()
    except OSError:
        current = None
    if current != stamp:
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out, exist_ok=True)
        with open(stamp_path, 'w', encoding='utf-8') as f:
            f.write(stamp + '\n')
    return out


def cached_gguf(variant='a', ftype='f32', arch='llama'):
    """Return ``<cached_test_model(variant)>/gguf/model-<ftype>.gguf``, exporting it once."""
    from .export_onnx import cached_test_model

    model_dir = cached_test_model(variant)
    stem = f'model-{ftype}' if arch == 'llama' else f'model-{arch}-{ftype}'
    path = os.path.join(_gguf_dir(model_dir), stem + '.gguf')
    if not os.path.isfile(path):
        export_text_gguf(model_dir, path, arch=arch, ftype=ftype)
    return path


def cached_internvl_gguf(variant='a', ftype='f32'):
    """Return the tiny InternVL's Qwen2 language model as a GGUF, exporting it once."""
    from .export_internvl import cached_internvl_model

    model_dir = cached_internvl_model(variant)
    path = os.path.join(_gguf_dir(model_dir), f'model-qwen2-{ftype}.gguf')
    if not os.path.isfile(path):
        export_text_gguf(model_dir, path, arch='qwen2', ftype=ftype, pre_tokenizer='qwen2')
    return path


def cached_mmproj(variant='a', ftype='f32', preproc_image_size=None):
    """Return ``<cached_test_model(variant)>/gguf/mmproj-<ftype>.gguf``, exporting it once."""
    from .export_onnx import cached_test_model

    model_dir = cached_test_model(variant)
    suffix = '' if preproc_image_size is None else f'-{preproc_image_size}'
    path = os.path.join(_gguf_dir(model_dir), f'mmproj-{ftype}{suffix}.gguf')
    if not os.path.isfile(path):
        export_mmproj_gguf(model_dir, path, ftype=ftype, preproc_image_size=preproc_image_size)
    return path


def cached_qwen2vl_gguf(variant='qwen2-a', ftype='f32'):
    """Return the tiny Qwen2(.5)-VL's language model as a ``qwen2vl`` GGUF, exporting it once."""
    from .qwen2vl_factory import cached_qwen2vl_model

    model_dir = cached_qwen2vl_model(variant)
    path = os.path.join(_gguf_dir(model_dir), f'model-qwen2vl-{ftype}.gguf')
    if not os.path.isfile(path):
        export_text_gguf(model_dir, path, arch='qwen2vl', ftype=ftype, pre_tokenizer='qwen2',
                         name=f'tiny-qwen2vl-{variant}')
    return path


def cached_qwen2vl_mmproj(variant='qwen2-a', ftype='f32'):
    """Return the tiny Qwen2(.5)-VL's vision tower and merger as an mmproj GGUF, once."""
    from .qwen2vl_factory import cached_qwen2vl_model

    model_dir = cached_qwen2vl_model(variant)
    path = os.path.join(_gguf_dir(model_dir), f'mmproj-{ftype}.gguf')
    if not os.path.isfile(path):
        export_mmproj_gguf(model_dir, path, ftype=ftype)
    return path


def main(argv=None):
    """Command line: export a checkpoint's language model (and projector) to GGUF."""
    import argparse

    parser = argparse.ArgumentParser(
        description='Export a SmolVLM or Qwen2(.5)-VL checkpoint to GGUF.')
    parser.add_argument('model_dir')
    parser.add_argument('out', help='language model GGUF to write')
    parser.add_argument('--arch', choices=ARCHS, default='llama',
                        help='qwen2vl for Qwen2-VL and Qwen2.5-VL')
    parser.add_argument('--ftype', choices=FTYPES, default='f32')
    parser.add_argument('--pre-tokenizer', default=None,
                        help=f'llama.cpp pre-tokenizer (default: qwen2 for qwen2vl, else '
                             f'{DEFAULT_PRE_TOKENIZER})')
    parser.add_argument('--mmproj', metavar='PATH', help='also write the projector here')
    args = parser.parse_args(argv)
    pre_tokenizer = args.pre_tokenizer or (
        'qwen2' if args.arch == 'qwen2vl' else DEFAULT_PRE_TOKENIZER)
    export_text_gguf(args.model_dir, args.out, arch=args.arch, ftype=args.ftype,
                     pre_tokenizer=pre_tokenizer)
    if args.mmproj:
        export_mmproj_gguf(args.model_dir, args.mmproj)


if __name__ == '__main__':
    main()
