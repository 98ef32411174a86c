"""
Qwen2-VL / Qwen2.5-VL end to end against transformers, token for token.

Tiny random-weight checkpoints of both families, two shapes each (``qwen2vl_factory``), run
through the engine's two paths to llama.cpp:

* our ONNX vision encoder (the tools' export: the vision tower with the grid-dependent
  rotary tables and attention windows as inputs, computed by the family) feeding the
  language model as a ``qwen2vl`` GGUF with M-RoPE positions from the family;
* llama.cpp's own projector (an mmproj GGUF through libmtmd), which lays the prompt out and
  places the image tokens itself; the family resizes each image as the processor does
  first, so libmtmd, which keeps an image already on its grid, encodes the processor's
  pixels.

The reference is transformers' processor and ``Qwen2VLForConditionalGeneration`` /
``Qwen2_5_VLForConditionalGeneration``. llama.cpp runs with an f32 KV cache (exact
settings); libmtmd computes the patch embedding in float16 (features ~5e-4 off, relative).
"""

import os

import numpy as np
from PIL import Image
import pytest

from reference import Reference
import vlm_ros
from vlm_ros.engine.errors import GenerationError, ModelMismatchError
from vlm_ros.engine.images import to_rgb

torch = pytest.importorskip('torch')
pytest.importorskip('llama_cpp')
os.environ.setdefault('HF_HUB_OFFLINE', '1')

from vlm_ros_tools.export_qwen2vl import cached_qwen2vl_onnx_model  # noqa: E402
from vlm_ros_tools.gguf_export import (cached_gguf, cached_qwen2vl_gguf,  # noqa: E402
                                       cached_qwen2vl_mmproj)
from vlm_ros_tools.qwen2vl_factory import load_processor, VARIANTS  # noqa: E402

PROMPT = 'Describe this image.'
NEW_TOKENS = 32
# (width, height): square and aligned to 28-pixel blocks; wide, tall and odd resized within
# the budget; tiny below min_pixels; large above max_pixels.
SIZES = {'square': (112, 112), 'wide': (300, 110), 'tall': (90, 260), 'odd': (131, 77),
         'tiny': (20, 30), 'large': (640, 480)}
CLASSES = {'qwen2_vl': 'Qwen2VLForConditionalGeneration',
           'qwen2_5_vl': 'Qwen2_5_VLForConditionalGeneration'}


def _image(size, seed=0):
    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 30, base.shape), 0, 255)
                           .astype(np.uint8))


@pytest.fixture(scope='module', params=sorted(VARIANTS))
def qwen(request):
    """(variant, reference, {'onnx': pipeline, 'mtmd': pipeline}) per tiny checkpoint."""
    variant = request.param
    model_dir = cached_qwen2vl_onnx_model(variant)
    family = VARIANTS[variant]['family']
    ref = Reference(model_dir, CLASSES[family], load_processor, NEW_TOKENS)
    gguf = cached_qwen2vl_gguf(variant, 'f32')
    pipes = {
        'onnx': vlm_ros.pipeline(model_dir, vision_model='onnx/vision_encoder.onnx',
                                 decoder_model=gguf, kv_type='f32', max_new_tokens=NEW_TOKENS),
        'mtmd': vlm_ros.pipeline(model_dir, vision_model=cached_qwen2vl_mmproj(variant, 'f32'),
                                 decoder_model=gguf, kv_type='f32', max_new_tokens=NEW_TOKENS),
    }
    yield variant, ref, pipes
    for pipe in pipes.values():
        pipe.close()


def _positions(ref, inputs):
    """Return transformers' M-RoPE positions [3, seq] for the processor's ``inputs``."""
    model = ref.model.model
    with torch.no_grad():
        positions, _ = model.get_rope_index(
            inputs['input_ids'], mm_token_type_ids=inputs.get('mm_token_type_ids'),
            image_grid_thw=inputs.get('image_grid_thw'),
            attention_mask=inputs.get('attention_mask'))
    return positions[:, 0].numpy()


# -- our ONNX vision encoder + llama.cpp -----------------------------------------------------

@pytest.mark.parametrize('kind', sorted(SIZES))
def test_greedy_tokens_match_transformers(qwen, kind):
    variant, ref, pipes = qwen
    image = _image(SIZES[kind], seed=1)
    inputs = ref.inputs(image, PROMPT)
    request = pipes['onnx'].family.prepare(image, PROMPT)
    assert request.input_ids.tolist() == inputs['input_ids'][0].tolist()
    assert request.positions.tolist() == _positions(ref, inputs).tolist()
    result = pipes['onnx'].generate(image, PROMPT)
    assert result.token_ids == ref.generate(inputs), f'{variant} {kind}: llama.cpp diverged'


def test_first_logits_match_pytorch(qwen):
    variant, ref, pipes = qwen
    image = _image(SIZES['wide'])
    pipe = pipes['onnx']
    request = pipe.family.prepare(to_rgb(image), PROMPT)
    request, features = pipe.vision.encode(request)
    session, logits = pipe.decoder.start(request.input_ids, features, request.image_token_id,
                                         positions=request.positions)
    session.close()
    expected = ref.first_logits(ref.inputs(image, PROMPT))
    assert np.abs(logits[0] - expected).max() <= 1e-3 * np.abs(expected).max()


@pytest.mark.parametrize('case', ['two_images', 'history', 'history_with_image'])
def test_several_images_and_history_match_transformers(qwen, case):
    variant, ref, pipes = qwen
    images = [_image(SIZES['wide']), _image(SIZES['tall'], seed=2)]
    history = ('What is it?', 'A robot arm on a table.')
    if case == 'two_images':
        imgs, hist = images, ()
    elif case == 'history':
        imgs, hist = images[:1], history
    else:
        imgs, hist = images[1:], ({'text': 'And this one?', 'images': images[:1]}, 'A cup.')
    inputs = ref.inputs(imgs, PROMPT, history=hist)
    request = pipes['onnx'].family.prepare(imgs, PROMPT, history=hist)
    assert request.positions.tolist() == _positions(ref, inputs).tolist()
    assert pipes['onnx'].generate(imgs, PROMPT, history=hist).token_ids == \
        ref.generate(inputs), f'{variant} {case}'


def test_a_follow_up_question_reuses_the_prompt_cells(qwen):
    """A second turn continues the kept KV cells: M-RoPE positions must line up."""
    variant, ref, pipes = qwen
    image = _image(SIZES['odd'], seed=4)
    first = pipes['onnx'].generate(image, PROMPT)
    answer = pipes['onnx'].family.decode(first.token_ids)
    history = ({'text': PROMPT, 'images': [image]}, answer)
    follow = pipes['onnx'].generate(None, 'Why?', history=history)
    inputs = ref.inputs(None, 'Why?', history=history)
    assert follow.cached_tokens >= first.prompt_tokens
    assert follow.token_ids == ref.generate(inputs), variant


def test_beam_search_matches_transformers(qwen):
    variant, ref, pipes = qwen
    image = _image(SIZES['square'], seed=5)
    inputs = ref.inputs(image, PROMPT)
    expected = ref.generate(inputs, num_beams=3, max_new_tokens=12)
    assert pipes['onnx'].generate(image, PROMPT, num_beams=3,
                                  max_new_tokens=12).token_ids == expected, variant


def test_batched_requests_answer_as_alone(qwen):
    """Requests decoded together (each its own M-RoPE offset) answer as they do alone."""
    import concurrent.futures
    variant, ref, pipes = qwen
    model_dir = cached_qwen2vl_onnx_model(variant)
    batched = vlm_ros.pipeline(model_dir, vision_model='onnx/vision_encoder.onnx',
                               decoder_model=cached_qwen2vl_gguf(variant, 'f32'),
                               kv_type='f32', max_new_tokens=NEW_TOKENS, max_concurrent=3)
    try:
        kinds = ['wide', 'tall', 'tiny']
        alone = {k: pipes['onnx'].generate(_image(SIZES[k]), PROMPT).token_ids for k in kinds}
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            together = dict(zip(kinds, pool.map(
                lambda k: batched.generate(_image(SIZES[k]), PROMPT).token_ids, kinds),
                strict=True))
    finally:
        batched.close()
    assert together == alone, variant


# -- llama.cpp's projector (libmtmd) ----------------------------------------------------------

@pytest.mark.parametrize('kind', sorted(SIZES))
def test_mtmd_lays_out_as_the_processor(qwen, kind):
    """Ids, positions and the size the model saw, as transformers has them."""
    variant, ref, pipes = qwen
    image = _image(SIZES[kind], seed=1)
    inputs = ref.inputs(image, PROMPT)
    pipe = pipes['mtmd']
    request, features = pipe.vision.encode(pipe.family.prepare(image, PROMPT))
    assert request.input_ids.tolist() == inputs['input_ids'][0].tolist(), kind
    assert request.positions.tolist() == _positions(ref, inputs).tolist(), kind
    _, grid_h, grid_w = inputs['image_grid_thw'][0].tolist()
    assert request.seen_sizes == [(grid_w * 14, grid_h * 14)]
    assert features.shape == (grid_h * grid_w // 4, ref.config.text_config.hidden_size)


@pytest.mark.parametrize('kind', sorted(SIZES))
def test_mtmd_greedy_tokens_match_transformers(qwen, kind):
    """Images resized by the family as the processor does reach libmtmd on its grid."""
    variant, ref, pipes = qwen
    image = _image(SIZES[kind], seed=3)
    result = pipes['mtmd'].generate(image, PROMPT)
    assert result.token_ids == ref.generate(ref.inputs(image, PROMPT)), f'{variant} {kind}'


def test_mtmd_two_images_and_history(qwen):
    variant, ref, pipes = qwen
    images = [_image(SIZES['wide'], seed=6), _image(SIZES['tall'], seed=7)]
    history = ('What is it?', 'A robot arm on a table.')
    for imgs, hist in ((images, ()), (images[:1], history)):
        inputs = ref.inputs(imgs, PROMPT, history=hist)
        result = pipes['mtmd'].generate(imgs, PROMPT, history=hist)
        assert result.token_ids == ref.generate(inputs), variant


# -- wrong combinations ------------------------------------------------------------------------

def test_positions_are_required_and_checked(qwen):
    from vlm_ros.engine.runtimes.llamacpp import LlamaCppDecoder
    variant, ref, pipes = qwen
    pipe = pipes['onnx']
    request = pipe.family.prepare(_image(SIZES['square']), PROMPT)
    request, features = pipe.vision.encode(request)
    with pytest.raises(GenerationError, match='M-RoPE'):
        pipe.decoder.start(request.input_ids, features, request.image_token_id)
    with pytest.raises(GenerationError, match='positions must be'):
        pipe.decoder.start(request.input_ids, features, request.image_token_id,
                           positions=request.positions[:, :-1])
    # A language model with one position per token refuses M-RoPE positions.
    plain = LlamaCppDecoder(cached_gguf('a', 'f32', 'qwen2'))
    try:
        with pytest.raises(ModelMismatchError, match='M-RoPE'):
            plain.start([1, 2, 3], positions=np.zeros((3, 3), dtype=np.int64))
    finally:
        plain.close()


def test_answers_keep_qwen2_vl_box_markers_on_both_paths(qwen):
    """Qwen2-VL writes boxes with special tokens: decoded answers keep them, others not."""
    variant, ref, pipes = qwen
    answer = ('<|object_ref_start|>cup<|object_ref_end|><|box_start|>(10,20),(300,400)'
              '<|box_end|>')
    ids = ref.processor.tokenizer.encode(answer + '<|im_end|>', add_special_tokens=False)
    keeps = VARIANTS[variant]['family'] == 'qwen2_vl'
    for name, pipe in pipes.items():
        text = pipe.family.decode(ids)
        assert text == (answer if keeps else 'cup(10,20),(300,400)'), (variant, name)


def test_mtmd_without_the_model_folder_keeps_libmtmd_bounds(qwen):
    """Check GGUFs alone (as ggml-org ships them): libmtmd's 8-4096 tokens per image."""
    from vlm_ros.engine.families.qwen2_vl import LIBMTMD_IMAGE_TOKENS
    variant, ref, pipes = qwen
    pipe = vlm_ros.pipeline(None, vision_model=cached_qwen2vl_mmproj(variant, 'f32'),
                            decoder_model=cached_qwen2vl_gguf(variant, 'f32'), kv_type='f32',
                            max_new_tokens=NEW_TOKENS)
    low, high = LIBMTMD_IMAGE_TOKENS
    size = {'shortest_edge': low * 28 * 28, 'longest_edge': high * 28 * 28}
    try:
        for kind in ('tiny', 'large'):
            image = _image(SIZES[kind], seed=8)
            inputs = ref.inputs(image, PROMPT, size=size)
            result = pipe.generate(image, PROMPT)
            assert result.prompt_tokens == inputs['input_ids'].shape[1], (variant, kind)
            assert result.token_ids == ref.generate(inputs), (variant, kind)
    finally:
        pipe.close()
