"""
The SmolVLM ONNX pipeline against transformers, token for token.

Tiny random-weight models with the real architecture and the hub's ONNX layout come from the
test tooling; the reference is SmolVLMForConditionalGeneration on PyTorch with transformers'
own processor.
"""

import os

import numpy as np
from PIL import Image
import pytest

from reference import Reference
import vlm_ros
from vlm_ros.engine.datatypes import ImageOptions
from vlm_ros.engine.errors import (ImageError, ModelFilesError, ModelMismatchError,
                                   PromptTooLongError, UnsupportedModelError)
from vlm_ros.engine.images import to_rgb

torch = pytest.importorskip('torch')
os.environ.setdefault('HF_HUB_OFFLINE', '1')

from vlm_ros_tools.export_onnx import cached_test_model  # noqa: E402
from vlm_ros_tools.smolvlm_factory import load_processor  # noqa: E402

PROMPT = 'Describe this image.'
NEW_TOKENS = 32


def _image(kind, seed=0):
    rng = np.random.default_rng(seed)
    sizes = {'square': (160, 160), 'wide': (320, 120), 'tall': (100, 300), 'tiny': (20, 30),
             'gray': (150, 100), 'rgba': (120, 90)}
    w, h = sizes[kind]
    # Smooth gradients plus noise: resampling filters matter, as on a real photo.
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1)
    pixels = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels)
    if kind == 'gray':
        img = img.convert('L')
    elif kind == 'rgba':
        alpha = rng.integers(0, 256, (h, w), dtype=np.uint8)
        img = Image.fromarray(np.dstack([pixels, alpha]), 'RGBA')
    return img


@pytest.fixture(scope='module', params=['a', 'b'])
def model(request):
    """(model_dir, our pipeline, the reference) per tiny config."""
    model_dir = cached_test_model(request.param)
    return request.param, model_dir, vlm_ros.pipeline(model_dir, max_new_tokens=NEW_TOKENS), \
        Reference(model_dir, 'SmolVLMForConditionalGeneration', load_processor, NEW_TOKENS)


CASES = [('square', None), ('wide', None), ('tall', None), ('tiny', None), ('gray', None),
         ('rgba', None), ('wide', False)]


@pytest.mark.parametrize('kind,split', CASES)
def test_greedy_tokens_match_transformers(model, kind, split):
    variant, _, pipe, ref = model
    image = _image(kind)
    kwargs = {} if split is None else {'do_image_splitting': split}
    inputs = ref.inputs(image, PROMPT, **kwargs)
    ours = pipe.family.prepare(to_rgb(image), PROMPT, '', ImageOptions(do_image_splitting=split))
    assert ours.input_ids.tolist() == inputs['input_ids'][0].tolist()
    ref_pixels = inputs['pixel_values'].numpy()
    assert ours.vision_inputs['pixel_values'].shape == ref_pixels.shape
    assert np.abs(ours.vision_inputs['pixel_values'] - ref_pixels).max() <= 1e-4
    expected = ref.generate(inputs)
    result = pipe.generate(image, PROMPT, image_options=ImageOptions(do_image_splitting=split))
    assert result.token_ids == expected, f'variant {variant}, {kind}: diverged'
    assert result.prompt_tokens == inputs['input_ids'].shape[1]
    assert result.finish_reason in ('stop', 'length')
    assert len(expected) == NEW_TOKENS or result.finish_reason == 'stop'


def test_first_logits_match_pytorch(model):
    _, _, pipe, ref = model
    image = _image('wide')
    inputs = ref.inputs(image, PROMPT)
    request = pipe.family.prepare(to_rgb(image), PROMPT)
    features = pipe.vision.run(request.vision_inputs)
    _, logits = pipe.decoder.start(request.input_ids, features, request.image_token_id)
    assert np.abs(logits[0] - ref.first_logits(inputs)).max() <= 1e-3


@pytest.mark.parametrize('beams', [2, 3])
def test_beam_search_matches_transformers(model, beams):
    _, _, pipe, ref = model
    image = _image('square', seed=3)
    expected = ref.generate(ref.inputs(image, PROMPT), num_beams=beams)
    result = pipe.generate(image, PROMPT, num_beams=beams)
    assert result.token_ids == expected


def test_sampling_is_reproducible_with_a_seed(model):
    _, _, pipe, _ = model
    image = _image('square')
    kwargs = {'temperature': 1.5, 'top_k': 50, 'top_p': 0.95, 'repetition_penalty': 1.2}
    first = pipe.generate(image, PROMPT, seed=11, **kwargs).token_ids
    assert pipe.generate(image, PROMPT, seed=11, **kwargs).token_ids == first
    others = {tuple(pipe.generate(image, PROMPT, seed=s, **kwargs).token_ids)
              for s in range(12, 16)}
    assert others - {tuple(first)}, 'different seeds never changed the sample'


def test_repetition_penalty_matches_transformers(model):
    _, _, pipe, ref = model
    image = _image('tall', seed=5)
    expected = ref.generate(ref.inputs(image, PROMPT), repetition_penalty=1.3)
    assert pipe.generate(image, PROMPT, repetition_penalty=1.3).token_ids == expected


def test_text_only_prompt_matches_transformers(model):
    _, _, pipe, ref = model
    expected = ref.generate(ref.inputs(None, 'Hello there.'))
    assert pipe.generate(None, 'Hello there.').token_ids == expected


def test_streamed_text_equals_final_text(model):
    _, _, pipe, _ = model
    pieces = []
    result = pipe.generate(_image('square'), PROMPT, on_text=pieces.append)
    assert ''.join(pieces) == result.text
    stream = pipe.stream(_image('square'), PROMPT)
    assert ''.join(stream) == result.text == stream.result.text


def test_stop_strings_and_timings(model):
    _, _, pipe, _ = model
    full = pipe.generate(_image('square', seed=99), PROMPT)  # an image not seen before
    assert full.text, 'the tiny model produced no text to cut'
    stop = full.text[len(full.text) // 2:][:2]
    cut = pipe.generate(_image('square', seed=99), PROMPT, stop=(stop,))
    assert cut.finish_reason == 'stop' and stop not in cut.text
    assert full.text.startswith(cut.text)
    t = full.timings
    assert t.preprocess_ms > 0 and t.vision_ms > 0 and t.prefill_ms > 0 and t.decode_ms > 0
    assert t.total_ms >= t.preprocess_ms + t.vision_ms + t.prefill_ms + t.decode_ms * 0.99
    assert full.image_tokens > 0 and full.prompt_tokens > full.image_tokens


def test_max_tiles_caps_image_tokens(model):
    _, model_dir, pipe, _ = model
    image = _image('wide')
    split = pipe.generate(image, PROMPT, max_new_tokens=1,
                          image_options=ImageOptions(do_image_splitting=True))
    capped = pipe.generate(image, PROMPT, max_new_tokens=1,
                           image_options=ImageOptions(do_image_splitting=True, max_tiles=2))
    single = pipe.generate(image, PROMPT, max_new_tokens=1,
                           image_options=ImageOptions(do_image_splitting=False))
    assert single.image_tokens < capped.image_tokens < split.image_tokens
    seq_len = single.image_tokens
    assert capped.image_tokens <= 3 * seq_len  # two tiles plus the global image


def test_int8_graphs_run_and_mostly_agree_on_the_first_token(model, capsys):
    variant, model_dir, pipe, _ = model
    int8 = vlm_ros.pipeline(model_dir, variant='int8', max_new_tokens=4)
    kinds = ['square', 'wide', 'tall', 'tiny', 'gray', 'rgba']
    agree = 0
    for i, kind in enumerate(kinds):
        image = _image(kind, seed=i)
        q = int8.generate(image, PROMPT)
        assert q.completion_tokens >= 1
        agree += q.token_ids[0] == pipe.generate(image, PROMPT, max_new_tokens=1).token_ids[0]
    with capsys.disabled():
        print(f'\n[int8 variant {variant}] first greedy token equals fp32 on '
              f'{agree}/{len(kinds)} images')


def test_bad_images_raise_image_error(model):
    _, _, pipe, _ = model
    bad = [np.zeros((0, 10, 3), np.uint8), np.zeros((10, 10, 2), np.uint8),
           np.zeros((10, 10, 3), np.complex64), np.full((8, 8, 3), np.nan, np.float32),
           b'not an image', np.zeros((4, 4, 4, 4), np.uint8)]
    for image in bad:
        with pytest.raises(ImageError):
            pipe.generate(image, PROMPT, max_new_tokens=1)


def test_prompt_longer_than_context(model):
    _, _, pipe, _ = model
    with pytest.raises(PromptTooLongError, match='context'):
        pipe.generate(None, 'word ' * (pipe.decoder.context_length + 10), max_new_tokens=1)


def test_model_file_errors(tmp_path):
    model_dir = cached_test_model('a')
    other = cached_test_model('b')
    with pytest.raises(ModelFilesError, match='vision_encoder_q4.onnx'):
        vlm_ros.pipeline(model_dir, variant='q4')
    with pytest.raises(ModelFilesError, match='config.json'):
        vlm_ros.pipeline(tmp_path)
    with pytest.raises(ModelMismatchError):
        vlm_ros.pipeline(model_dir, decoder_model=f'{other}/onnx/decoder_model_merged.onnx')
    with pytest.raises(ModelMismatchError):
        vlm_ros.pipeline(model_dir, vision_model=f'{other}/onnx/vision_encoder.onnx')
    corrupt = tmp_path / 'broken.onnx'
    corrupt.write_bytes(b'\x00' * 64)
    with pytest.raises(ModelFilesError, match='broken.onnx'):
        vlm_ros.pipeline(model_dir, vision_model=corrupt)


def test_unknown_onnx_input_names(tmp_path):
    import onnx
    model_dir = cached_test_model('a')
    graph = onnx.load(f'{model_dir}/onnx/decoder_model_merged.onnx')
    graph.graph.input.append(onnx.helper.make_tensor_value_info(
        'mystery_flag', onnx.TensorProto.FLOAT, [1]))
    onnx.save(graph, str(tmp_path / 'decoder_model_merged.onnx'))
    with pytest.raises(UnsupportedModelError, match='mystery_flag'):
        vlm_ros.pipeline(model_dir, decoder_model=tmp_path / 'decoder_model_merged.onnx',
                         embed_model='onnx/embed_tokens.onnx')


@pytest.mark.parametrize('case', ['two_images', 'history', 'both'])
def test_several_images_and_history_match_transformers(model, case):
    """Two images in one question and a 2-turn conversation, laid out as the processor does."""
    _, _, pipe, ref = model
    images = {'two_images': [_image('wide'), _image('square', seed=5)],
              'history': [_image('tall')], 'both': [_image('rgba'), _image('tiny', seed=2)]}[case]
    history = () if case == 'two_images' else ('What is it?', 'A robot arm on a table.')
    ref.check(pipe, images, PROMPT, history)
