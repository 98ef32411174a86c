"""
The Qwen2-VL / Qwen2.5-VL GGUF exports in llama.cpp and libmtmd, against transformers.

``vlm_ros_tools.gguf_export`` writes the tiny random-weight checkpoints of ``qwen2vl_factory``
in the layout of llama.cpp's converter: the language model as architecture ``qwen2vl`` and
the vision tower as an mmproj (projector ``qwen2vl_merger`` or ``qwen2.5vl_merger``). These
tests run both through llama-cpp-python's low-level API (float32 KV cache, no flash
attention) and compare with transformers on the same weights: text logits, the image chunks
libmtmd makes (tokens, grid, positions, the tokens around them), the image features and the
logits after a prompt with an image.

What they pin down about libmtmd for these projectors:

* An image whose sides are multiples of 28 and whose merged-token count is within the
  projector's limits is encoded unresized; others are resized to the nearest multiples of 28
  (``std::round``, so halves round up where transformers' ``round`` rounds to even) with
  libmtmd's own bicubic filter, so their pixels differ from the processor's.
* The limits are 8 to 4096 merged tokens, set by the projector type: the GGUF keys
  ``clip.vision.image_min_pixels`` / ``image_max_pixels`` are not read for these projectors
  (the converter does not write them either), only ``mtmd_context_params.image_min_tokens``
  / ``image_max_tokens`` change them. With the processor's limits passed there, libmtmd
  picks the processor's grid for any size.
* Qwen2.5-VL's window attention always uses 112-pixel windows (the real models' size, and
  the tiny models'); ``clip.vision.window_size`` is not read, so a checkpoint with other
  windows would only match transformers run with 112-pixel windows.
* An image chunk holds ``grid_h * grid_w / 4`` embeddings (``nx = grid_w / 2``, ``ny =
  grid_h / 2``) and advances the position by ``max(nx, ny)``, as transformers'
  ``get_rope_index`` does; ``mtmd_tokenize`` puts ``<|vision_start|>`` before and
  ``<|vision_end|>`` after it, where the chat template has
  ``<|vision_start|><|image_pad|><|vision_end|>``.
"""

import contextlib
import ctypes
import json
import os

import numpy as np
from PIL import Image
import pytest

from reference import Reference

torch = pytest.importorskip('torch')
gguf = pytest.importorskip('gguf')
llama_cpp = pytest.importorskip('llama_cpp')
mtmd_cpp = pytest.importorskip('llama_cpp.mtmd_cpp')
os.environ.setdefault('HF_HUB_OFFLINE', '1')

from vlm_ros_tools.gguf_export import (cached_qwen2vl_gguf,  # noqa: E402
                                       cached_qwen2vl_mmproj, export_mmproj_gguf,
                                       export_text_gguf, QWEN2VL_PROJECTORS)
from vlm_ros_tools.qwen2vl_factory import (cached_qwen2vl_model,  # noqa: E402
                                           load_processor, MAX_MERGED, model_class,
                                           VARIANTS)

PROMPT = 'What is in this picture?'
MARKER = '<__media__>'
HF_IMAGE = '<|vision_start|><|image_pad|><|vision_end|>'
# (width, height): multiples of 28 within the token limits of both sides, so no resize; the
# last two span two 112-pixel attention windows (Qwen2.5-VL).
ALIGNED = ((84, 112), (112, 56), (168, 84), (56, 196))
# Resized by both to 140x84: no halves, where the two rounding rules would differ.
RESIZED = (130, 90)
LLAMACPP_WINDOW = 112
"""Qwen2.5-VL attention window (pixels) libmtmd uses whatever the checkpoint says."""
LLAMACPP_TOKEN_LIMITS = (8, 4096)
TEXT_TOLERANCE = 1e-3
"""Largest logit difference allowed, relative to the largest reference logit (f32 GGUF)."""
FEATURE_TOLERANCE = 2e-3
"""
Same for image features and the logits after an image (measured up to 6e-4 and 7e-4).

Most of it is libmtmd computing the patch embedding in float16: transformers fed pixels and
kernel rounded to float16 meets it to 1e-6 at the first LayerNorm.
"""


def _image(size, seed=0):
    """Return a deterministic noise picture of ``size`` (width, height)."""
    w, h = size
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _relative(ours, expected):
    """Return the largest difference relative to the largest reference magnitude."""
    return float(np.abs(ours - expected).max() / np.abs(expected).max())


class Qwen2VLReference(Reference):
    """transformers' processor and model of one tiny Qwen2(.5)-VL variant."""

    def __init__(self, variant):
        super().__init__(cached_qwen2vl_model(variant), model_class(variant).__name__,
                         load_processor)
        self.variant = variant

    @contextlib.contextmanager
    def window(self, size):
        """Run the vision tower with ``size``-pixel attention windows (Qwen2.5-VL only)."""
        visual = self.model.model.visual
        saved = getattr(visual, 'window_size', None)
        if saved is not None and size is not None:
            visual.window_size = size
        try:
            yield
        finally:
            if saved is not None:
                visual.window_size = saved

    def features(self, inputs):
        """Return ``get_image_features`` of the one image in ``inputs``: [tokens, hidden]."""
        with torch.no_grad():
            out = self.model.model.get_image_features(inputs['pixel_values'],
                                                      inputs['image_grid_thw'])
        return out.pooler_output[0].numpy()

    def text_logits(self, ids):
        """Return the logits after text-only ``ids`` (transformers' own positions)."""
        with torch.no_grad():
            return self.model(input_ids=torch.tensor([ids])).logits[0, -1].numpy()

    def n_positions(self, inputs):
        """Return the position after the prompt: 1 + the largest M-RoPE position."""
        positions, _ = self.model.model.get_rope_index(
            inputs['input_ids'], inputs['mm_token_type_ids'], inputs['image_grid_thw'],
            attention_mask=inputs['attention_mask'])
        return int(positions.max()) + 1


class LlamaCpp:
    """A GGUF language model in one exact llama.cpp context (f32 KV cache, no flash attn)."""

    def __init__(self, path, n_ctx=512):
        L = llama_cpp
        self.model = L.llama_model_load_from_file(os.fspath(path).encode(),
                                                  L.llama_model_default_params())
        assert self.model, f'llama.cpp cannot load {path}'
        params = L.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = n_ctx
        params.type_k = params.type_v = 0  # GGML_TYPE_F32
        params.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.n_threads = params.n_threads_batch = 1
        self.ctx = L.llama_init_from_model(self.model, params)
        assert self.ctx, f'llama.cpp cannot make a context for {path}'
        self.n_ctx = n_ctx
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.n_embd = L.llama_model_n_embd(self.model)

    def clear(self):
        """Forget every sequence in the KV cache."""
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)

    def last_logits(self):
        """Return the logits of the last position that asked for them."""
        ptr = llama_cpp.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def text_logits(self, ids):
        """Decode ``ids`` at positions 0, 1, ... in one token batch; return the last logits."""
        self.clear()
        batch = llama_cpp.llama_batch_init(len(ids), 0, 1)
        try:
            for i, token in enumerate(ids):
                batch.token[i] = int(token)
                batch.pos[i] = i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = i == len(ids) - 1
            batch.n_tokens = len(ids)
            assert llama_cpp.llama_decode(self.ctx, batch) == 0
        finally:
            llama_cpp.llama_batch_free(batch)
        return self.last_logits()

    def tokenize(self, text):
        """Return llama.cpp's token ids for ``text`` (special tokens parsed, none added)."""
        data = text.encode()
        out = (llama_cpp.llama_token * (len(data) + 8))()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), out, len(out), False, True)
        assert n >= 0
        return list(out[:n])

    def close(self):
        """Free the context and the model."""
        llama_cpp.llama_free(self.ctx)
        llama_cpp.llama_model_free(self.model)


class ImageChunk:
    """What libmtmd made of one image: its chunk and the numbers it reports."""

    def __init__(self, chunk):
        tokens = mtmd_cpp.mtmd_input_chunk_get_tokens_image(chunk)
        self.chunk = chunk
        self.n_tokens = mtmd_cpp.mtmd_input_chunk_get_n_tokens(chunk)
        self.nx = mtmd_cpp.mtmd_image_tokens_get_nx(tokens)
        self.ny = mtmd_cpp.mtmd_image_tokens_get_ny(tokens)
        self.n_pos = mtmd_cpp.mtmd_input_chunk_get_n_pos(chunk)


class Mtmd:
    """libmtmd with one exported mmproj on top of a ``LlamaCpp`` language model."""

    def __init__(self, llama, mmproj, token_limits=(-1, -1)):
        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu = False
        params.n_threads = 1
        params.print_timings = False
        params.warmup = False
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.media_marker = MARKER.encode()
        params.image_min_tokens, params.image_max_tokens = token_limits
        self.llama = llama
        self.ctx = mtmd_cpp.mtmd_init_from_file(os.fspath(mmproj).encode(), llama.model, params)
        assert self.ctx, f'libmtmd cannot load {mmproj}'

    @contextlib.contextmanager
    def tokenize(self, prompt, image):
        """
        Yield ``(items, chunks)`` for a chat ``prompt`` holding one image.

        ``prompt`` is the processor's rendering; its image block becomes the media marker.
        ``items`` lists the text token ids in order with an ``ImageChunk`` in the image's
        place; ``chunks`` is the handle for ``mtmd_helper_eval_chunks``.
        """
        assert prompt.count(HF_IMAGE) == 1
        text = prompt.replace(HF_IMAGE, MARKER).encode()
        rgb = np.ascontiguousarray(np.asarray(image.convert('RGB'), dtype=np.uint8))
        bitmap = mtmd_cpp.mtmd_bitmap_init(rgb.shape[1], rgb.shape[0],
                                           (ctypes.c_uint8 * rgb.size).from_buffer_copy(rgb))
        chunks = mtmd_cpp.mtmd_input_chunks_init()
        try:
            part = mtmd_cpp.mtmd_input_text()
            part.text, part.text_len = text, len(text)
            part.add_special, part.parse_special = False, True
            bitmaps = (mtmd_cpp.mtmd_bitmap_p_ctypes * 1)(bitmap)
            assert mtmd_cpp.mtmd_tokenize(self.ctx, chunks, ctypes.byref(part), bitmaps, 1) == 0
            items = []
            for i in range(mtmd_cpp.mtmd_input_chunks_size(chunks)):
                chunk = mtmd_cpp.mtmd_input_chunks_get(chunks, i)
                if (mtmd_cpp.mtmd_input_chunk_get_type(chunk)
                        == mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_IMAGE):
                    items.append(ImageChunk(chunk))
                else:
                    n = ctypes.c_size_t()
                    ids = mtmd_cpp.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                    items.extend(int(ids[j]) for j in range(n.value))
            yield items, chunks
        finally:
            mtmd_cpp.mtmd_input_chunks_free(chunks)
            mtmd_cpp.mtmd_bitmap_free(bitmap)

    def encode(self, image_chunk):
        """Return libmtmd's embeddings of an ``ImageChunk``: [tokens, hidden]."""
        assert mtmd_cpp.mtmd_encode_chunk(self.ctx, image_chunk.chunk) == 0
        ptr = mtmd_cpp.mtmd_get_output_embd(self.ctx)
        n = image_chunk.n_tokens * self.llama.n_embd
        return np.ctypeslib.as_array(ptr, shape=(n,)).reshape(image_chunk.n_tokens, -1).copy()

    def decode(self, chunks):
        """Decode ``chunks`` from position 0 (M-RoPE image positions); return (logits, n_past)."""
        self.llama.clear()
        n_past = llama_cpp.llama_pos(0)
        assert mtmd_cpp.mtmd_helper_eval_chunks(self.ctx, self.llama.ctx, chunks, 0, 0,
                                                self.llama.n_ctx, True,
                                                ctypes.byref(n_past)) == 0
        return self.llama.last_logits(), n_past.value

    def close(self):
        """Free the libmtmd context."""
        mtmd_cpp.mtmd_free(self.ctx)


def _split(items):
    """Return (text ids before the image, the ImageChunk, text ids after it)."""
    at = [i for i, item in enumerate(items) if isinstance(item, ImageChunk)]
    assert len(at) == 1, f'expected one image chunk, got {len(at)}'
    return items[:at[0]], items[at[0]], items[at[0] + 1:]


def _check_chunk(ref, inputs, items):
    """Assert that libmtmd laid the prompt out as the processor did; return the ImageChunk."""
    before, image, after = _split(items)
    _, grid_h, grid_w = inputs['image_grid_thw'][0].tolist()
    expected = (grid_h * grid_w // 4, grid_w // 2, grid_h // 2)
    assert (image.n_tokens, image.nx, image.ny) == expected
    assert image.n_pos == max(image.nx, image.ny)
    ids = inputs['input_ids'][0].tolist()
    pad = ref.config.image_token_id
    first = ids.index(pad)
    assert ids[first:first + image.n_tokens] == [pad] * image.n_tokens
    assert before == ids[:first] and after == ids[first + image.n_tokens:]
    assert before[-1] == ref.config.vision_start_token_id
    assert after[0] == ref.config.vision_end_token_id
    return image


@pytest.fixture(scope='module', params=sorted(VARIANTS))
def qwen(request):
    """Yield (reference, exact llama.cpp decoder, libmtmd) for each tiny variant."""
    variant = request.param
    ref = Qwen2VLReference(variant)
    llama = LlamaCpp(cached_qwen2vl_gguf(variant, 'f32'))
    mtmd = Mtmd(llama, cached_qwen2vl_mmproj(variant, 'f32'))
    yield ref, llama, mtmd
    mtmd.close()
    llama.close()


def _windows(ref):
    """Return the attention window libmtmd runs (Qwen2.5-VL) or None (Qwen2-VL)."""
    return LLAMACPP_WINDOW if ref.config.model_type == 'qwen2_5_vl' else None


# -- the files ------------------------------------------------------------------------------

@pytest.mark.parametrize('variant', sorted(VARIANTS))
def test_gguf_layout(variant):
    """Check the metadata and tensor names the converter would write."""
    ref_config = VARIANTS[variant]
    text = gguf.GGUFReader(cached_qwen2vl_gguf(variant, 'f32'))
    assert text.fields['general.architecture'].contents() == 'qwen2vl'
    sections = ref_config['text']['mrope_section']
    assert text.fields['qwen2vl.rope.dimension_sections'].contents() == sections + [0]
    assert text.fields['tokenizer.ggml.pre'].contents() == 'qwen2'
    assert '<|image_pad|>' in text.fields['tokenizer.chat_template'].contents()
    names = {t.name for t in text.tensors}
    assert {'blk.0.attn_q.bias', 'blk.0.attn_k.bias', 'blk.0.attn_v.bias'} <= names
    assert ('output.weight' in names) != ref_config['tie_word_embeddings']

    mmproj = gguf.GGUFReader(cached_qwen2vl_mmproj(variant, 'f32'))
    fields = {k: f.contents() for k, f in mmproj.fields.items() if not k.startswith('GGUF.')}
    family = 'qwen2_vl' if variant.startswith('qwen2-') else 'qwen2_5_vl'
    assert fields['general.architecture'] == 'clip'
    assert fields['general.type'] == 'mmproj'
    assert fields['clip.projector_type'] == QWEN2VL_PROJECTORS[family]
    assert fields['clip.vision.projection_dim'] == ref_config['text']['hidden_size']
    assert fields['clip.vision.block_count'] == ref_config['vision']['depth']
    names = {t.name for t in mmproj.tensors}
    assert {'v.patch_embd.weight', 'v.patch_embd.weight.1', 'v.post_ln.weight', 'mm.0.weight',
            'mm.0.bias', 'mm.2.weight', 'mm.2.bias', 'v.blk.0.attn_q.weight',
            'v.blk.0.attn_k.bias', 'v.blk.0.attn_v.weight', 'v.blk.0.attn_out.weight',
            'v.blk.0.ffn_up.weight', 'v.blk.0.ffn_down.weight'} <= names
    assert not any('qkv' in name for name in names)
    if family == 'qwen2_vl':
        assert 'v.blk.0.ln1.bias' in names and 'v.blk.0.ffn_gate.weight' not in names
        assert 'clip.vision.n_wa_pattern' not in fields
    else:
        # RMSNorm without bias, gated SiLU MLP, full attention every n_wa_pattern-th block.
        assert 'v.blk.0.ln1.bias' not in names and 'v.blk.0.ffn_gate.weight' in names
        assert fields['clip.use_silu'] is True
        full = ref_config['vision']['fullatt_block_indexes']
        assert fields['clip.vision.n_wa_pattern'] == full[0] + 1


def _hub_style_copy(variant, out_dir, edit):
    """Copy a tiny checkpoint to ``out_dir`` with ``edit(config)`` applied to config.json."""
    src = cached_qwen2vl_model(variant)
    os.makedirs(out_dir)
    for name in os.listdir(src):
        if name != 'config.json' and os.path.isfile(os.path.join(src, name)):
            os.symlink(os.path.join(src, name), os.path.join(out_dir, name))
    with open(os.path.join(src, 'config.json'), encoding='utf-8') as f:
        config = json.load(f)
    edit(config)
    with open(os.path.join(out_dir, 'config.json'), 'w', encoding='utf-8') as f:
        json.dump(config, f)
    return out_dir


def test_hub_style_configs(tmp_path):
    """Read the official repos' config layout: text settings and rope_scaling at the top."""
    def flatten(config):
        text = config.pop('text_config')
        parameters = text.pop('rope_parameters')
        text.pop('model_type')
        config.update(text)
        config['rope_scaling'] = {'type': 'mrope',
                                  'mrope_section': parameters['mrope_section']}

    def uneven_windows(config):
        config['vision_config']['fullatt_block_indexes'] = [1, 2]

    for variant in ('qwen2-a', 'qwen25-b'):
        hub = _hub_style_copy(variant, str(tmp_path / variant), flatten)
        ours = gguf.GGUFReader(export_text_gguf(hub, str(tmp_path / f'{variant}.gguf'),
                                                arch='qwen2vl', pre_tokenizer='qwen2'))
        cached = gguf.GGUFReader(cached_qwen2vl_gguf(variant, 'f32'))
        for key in ('qwen2vl.rope.dimension_sections', 'qwen2vl.rope.freq_base',
                    'qwen2vl.embedding_length', 'qwen2vl.attention.head_count_kv'):
            assert ours.fields[key].contents() == cached.fields[key].contents(), key
        assert [t.name for t in ours.tensors] == [t.name for t in cached.tensors]
        # A converted checkpoint is named after its folder (llama.cpp logs it), not "tiny".
        assert ours.fields['general.name'].contents() == variant
        mmproj = gguf.GGUFReader(export_mmproj_gguf(hub, str(tmp_path / f'{variant}-mm.gguf')))
        assert mmproj.fields['general.name'].contents() == f'{variant}-mmproj'
    bad = _hub_style_copy('qwen25-a', str(tmp_path / 'uneven'), uneven_windows)
    with pytest.raises(ValueError, match='fullatt_block_indexes'):
        export_mmproj_gguf(bad, str(tmp_path / 'uneven.gguf'))


# -- (a) the language model -----------------------------------------------------------------

def test_text_logits_match_transformers(qwen):
    """Check llama.cpp's text-only logits (1-D positions for every M-RoPE section)."""
    ref, llama, _ = qwen
    prompt = ref.text(0, 'Describe the robot on the table, please.')
    ids = ref.processor.tokenizer(prompt, add_special_tokens=False)['input_ids']
    assert llama.tokenize(prompt) == ids
    expected = ref.text_logits(ids)
    diff = _relative(llama.text_logits(ids), expected)
    assert diff <= TEXT_TOLERANCE, f'{ref.variant}: relative logit difference {diff:.2e}'


def test_quantized_text_logits_are_close():
    """Check that a q8_0 language model loads and stays near transformers."""
    path = cached_qwen2vl_gguf('qwen2-a', 'q8_0')
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types['blk.0.attn_q.weight'] == gguf.GGMLQuantizationType.Q8_0
    assert types['blk.0.attn_q.bias'] == gguf.GGMLQuantizationType.F32
    ref = Qwen2VLReference('qwen2-a')
    llama = LlamaCpp(path)
    try:
        ids = ref.processor.tokenizer(ref.text(0, PROMPT), add_special_tokens=False)['input_ids']
        diff = _relative(llama.text_logits(ids), ref.text_logits(ids))
    finally:
        llama.close()
    # The tiny random weights quantise badly: about 5e-2, half from the Q8_0 weights, half
    # from llama.cpp quantising the activations for the Q8_0 products.
    assert diff <= 0.1, f'q8_0: relative logit difference {diff:.2e}'


# -- (b) libmtmd with the projector ---------------------------------------------------------

def test_mtmd_lays_out_images_as_the_processor(qwen):
    """Check token count, grid, positions and the tokens around each image."""
    ref, _, mtmd = qwen
    assert mtmd_cpp.mtmd_decode_use_mrope(mtmd.ctx)
    assert mtmd_cpp.mtmd_support_vision(mtmd.ctx)
    for size in ALIGNED + (RESIZED,):
        image = _image(size)
        inputs = ref.inputs(image, PROMPT)
        with mtmd.tokenize(ref.text(1, PROMPT), image) as (items, _):
            _check_chunk(ref, inputs, items)


def test_mtmd_features_match_transformers(qwen, capsys):
    """Check libmtmd's embeddings of images it does not resize."""
    ref, _, mtmd = qwen
    worst = (0.0, 0.0, 0.0)
    for size in ALIGNED:
        image = _image(size, seed=1)
        inputs = ref.inputs(image, PROMPT)
        with ref.window(_windows(ref)):
            expected = ref.features(inputs)
        with mtmd.tokenize(ref.text(1, PROMPT), image) as (items, _):
            ours = mtmd.encode(_check_chunk(ref, inputs, items))
        assert ours.shape == expected.shape
        diff = _relative(ours, expected)
        assert diff <= FEATURE_TOLERANCE, f'{ref.variant} {size}: relative difference {diff}'
        if diff > worst[0]:
            worst = (diff, float(np.abs(ours - expected).max()), float(np.abs(expected).max()))
    with capsys.disabled():
        print(f'\n[mtmd {ref.variant}] feature diff {worst[1]:.2e} (features up to '
              f'{worst[2]:.1f}, relative {worst[0]:.1e})')


def test_image_prompt_logits_match_transformers(qwen):
    """Check the logits after a prompt with an image, decoded with libmtmd's positions."""
    ref, _, mtmd = qwen
    for size in ((84, 112), (168, 84)):
        image = _image(size, seed=2)
        inputs = ref.inputs(image, PROMPT)
        with ref.window(_windows(ref)):
            expected = ref.first_logits(inputs)
        with mtmd.tokenize(ref.text(1, PROMPT), image) as (items, chunks):
            _check_chunk(ref, inputs, items)
            logits, n_past = mtmd.decode(chunks)
        assert n_past == ref.n_positions(inputs)
        diff = _relative(logits, expected)
        assert diff <= FEATURE_TOLERANCE, f'{ref.variant} {size}: relative difference {diff}'


def test_mtmd_ignores_the_checkpoint_window_size():
    """Check that libmtmd runs 112-pixel windows, whatever another window would give."""
    ref = Qwen2VLReference('qwen25-a')
    assert ref.config.vision_config.window_size == LLAMACPP_WINDOW
    llama = LlamaCpp(cached_qwen2vl_gguf('qwen25-a', 'f32'))
    mtmd = Mtmd(llama, cached_qwen2vl_mmproj('qwen25-a', 'f32'))
    try:
        image = _image((168, 84), seed=3)
        inputs = ref.inputs(image, PROMPT)
        with mtmd.tokenize(ref.text(1, PROMPT), image) as (items, _):
            ours = mtmd.encode(_check_chunk(ref, inputs, items))
    finally:
        mtmd.close()
        llama.close()
    assert _relative(ours, ref.features(inputs)) <= FEATURE_TOLERANCE
    # The same checkpoint with 56-pixel windows: libmtmd would still run 112-pixel ones.
    with ref.window(LLAMACPP_WINDOW // 2):
        assert _relative(ours, ref.features(inputs)) > 0.01


def test_mtmd_token_limits():
    """Check libmtmd's own 8..4096 tokens, and that it follows the processor's when told."""
    ref = Qwen2VLReference('qwen2-a')
    pre = ref.processor.image_processor
    unit = (pre.patch_size * pre.merge_size) ** 2
    # transformers 5 keeps min_pixels / max_pixels as the size's shortest / longest edge.
    limits = (pre.size.shortest_edge // unit, pre.size.longest_edge // unit)
    assert limits == (4, MAX_MERGED)
    llama = LlamaCpp(cached_qwen2vl_gguf('qwen2-a', 'f32'))
    default = Mtmd(llama, cached_qwen2vl_mmproj('qwen2-a', 'f32'))
    custom = Mtmd(llama, cached_qwen2vl_mmproj('qwen2-a', 'f32'), token_limits=limits)
    try:
        # Below the processor's minimum: 4 tokens there, upscaled to 3x3 by libmtmd.
        small, large = _image((56, 56)), _image((300, 200))
        with default.tokenize(ref.text(1, PROMPT), small) as (items, _):
            image = _split(items)[1]
            assert (image.nx, image.ny) == (3, 3)
            assert image.n_tokens >= LLAMACPP_TOKEN_LIMITS[0]
        # Above the processor's maximum: libmtmd only rounds it to 308x196.
        with default.tokenize(ref.text(1, PROMPT), large) as (items, _):
            image = _split(items)[1]
            assert (image.nx, image.ny) == (11, 7)
            assert image.n_tokens > MAX_MERGED
        for picture in (small, large):
            inputs = ref.inputs(picture, PROMPT)
            with custom.tokenize(ref.text(1, PROMPT), picture) as (items, _):
                _check_chunk(ref, inputs, items)
    finally:
        custom.close()
        default.close()
        llama.close()
