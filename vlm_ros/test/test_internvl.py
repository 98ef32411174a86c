"""
The InternVL family and its ONNX pipeline against transformers, pixel and token for token.

Tiny random-weight InternVLForConditionalGeneration models (InternViT + pixel shuffle + MLP
projector + Qwen2) in the -hf repositories' file layout come from the test tooling; the
reference is transformers' InternVLProcessor (PIL GotOcr2 image processor) and the PyTorch
model. The original remote-code layout (``internvl_chat``) is checked on a copy of the same
tiny model rewritten in that layout, against ``model.chat``'s prompt format.
"""

import json
import os
import shutil

import numpy as np
from PIL import Image
import pytest

from reference import Reference
import vlm_ros
from vlm_ros.engine.datatypes import ImageOptions
from vlm_ros.engine.errors import ImageError, ModelMismatchError
from vlm_ros.engine.families import load_family
from vlm_ros.engine.families.internvl import best_grid, InternVLFamily
from vlm_ros.engine.images import to_rgb

torch = pytest.importorskip('torch')
os.environ.setdefault('HF_HUB_OFFLINE', '1')

from vlm_ros_tools.export_internvl import cached_internvl_model  # noqa: E402
from vlm_ros_tools.internvl_factory import load_processor  # noqa: E402

PROMPT = 'Describe this image.'
NEW_TOKENS = 32
# What the remote code's chat() writes before the question (one image).
CHAT_SYSTEM = 'I am InternVL, a multimodal large language model.'
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + CHAT_SYSTEM + "<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# (width, height): tile counts depend on the variant's tile size (64 or 96 pixels).
SIZES = {'small': (60, 60), 'wide': (320, 120), 'tall': (100, 300), 'square': (160, 160),
         'tiny': (20, 30), 'photo': (320, 240)}


def _image(kind, seed=0):
    rng = np.random.default_rng(seed)
    w, h = SIZES[kind]
    # Smooth gradients plus noise: resampling filters matter, as on a real photo.
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1)
    pixels = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope='module', params=['a', 'b'])
def model(request):
    """(variant, model_dir, our pipeline, the reference) per tiny config."""
    model_dir = cached_internvl_model(request.param)
    return request.param, model_dir, vlm_ros.pipeline(model_dir, max_new_tokens=NEW_TOKENS), \
        Reference(model_dir, 'InternVLForConditionalGeneration', load_processor, NEW_TOKENS)


def _options(split=None, max_tiles=0):
    return ImageOptions(do_image_splitting=split, max_tiles=max_tiles)


def _reference_kwargs(split=None, max_tiles=0):
    kwargs = {}
    if split is not None:
        kwargs['crop_to_patches'] = split
    if max_tiles:
        kwargs['max_patches'] = max_tiles
    return kwargs


# (image, do_image_splitting, max_tiles): one tile, wide and tall grids, a square image whose
# grid comes from the tie-break, splitting disabled, a capped grid.
CASES = [('small', None, 0), ('wide', None, 0), ('tall', None, 0), ('square', None, 0),
         ('tiny', None, 0), ('photo', None, 0), ('wide', False, 0), ('photo', None, 2),
         ('wide', None, 2)]


@pytest.mark.parametrize('kind,split,max_tiles', CASES)
def test_preprocessing_matches_the_processor(model, kind, split, max_tiles, capsys):
    variant, _, pipe, ref = model
    image = _image(kind)
    inputs = ref.inputs(image, PROMPT, **_reference_kwargs(split, max_tiles))
    ours = pipe.family.prepare(to_rgb(image), PROMPT, '', _options(split, max_tiles))
    assert ours.input_ids.tolist() == inputs['input_ids'][0].tolist()
    ref_pixels = inputs['pixel_values'].numpy()
    pixels = ours.vision_inputs['pixel_values']
    assert pixels.dtype == np.float32 and pixels.shape == ref_pixels.shape
    diff = float(np.abs(pixels - ref_pixels).max())
    with capsys.disabled():
        print(f'\n[internvl {variant}] {kind} split={split} max_tiles={max_tiles}: '
              f'{pixels.shape[0]} tiles, max pixel diff {diff:g}')
    assert diff <= 1e-4
    assert ours.num_image_tokens == pixels.shape[0] * pipe.family.image_seq_length


def test_tile_counts(model):
    _, _, pipe, _ = model
    family = pipe.family
    tile = family.tile_size
    assert family.plan(60, 60).num_tiles == 1
    wide = family.plan(120, 320)
    assert wide.cols > wide.rows and wide.thumbnail
    tall = family.plan(300, 100)
    assert tall.rows > tall.cols and tall.thumbnail
    assert family.plan(120, 320, _options(split=False)).num_tiles == 1
    capped = family.plan(240, 320, _options(max_tiles=2))
    assert capped.cols * capped.rows <= 2
    # A tie on the aspect ratio goes to the larger grid while the image is big enough.
    assert best_grid(tile, tile, tile, 1, 4) == (1, 1)
    assert best_grid(2 * tile, 2 * tile, tile, 1, 4) == (2, 2)
    with pytest.raises(ImageError):
        family.plan(60, 60, _options(max_tiles=-1))


@pytest.mark.parametrize('kind', ['small', 'wide', 'tall', 'square'])
def test_greedy_tokens_match_transformers(model, kind):
    variant, _, pipe, ref = model
    image = _image(kind, seed=1)
    inputs = ref.inputs(image, PROMPT)
    expected = ref.generate(inputs)
    result = pipe.generate(image, PROMPT)
    assert result.token_ids == expected, f'variant {variant}, {kind}: diverged'
    assert result.prompt_tokens == inputs['input_ids'].shape[1]
    assert result.finish_reason in ('stop', 'length')
    assert len(expected) == NEW_TOKENS or result.finish_reason == 'stop'


def test_greedy_tokens_without_splitting(model):
    _, _, pipe, ref = model
    image = _image('wide', seed=2)
    expected = ref.generate(ref.inputs(image, PROMPT, crop_to_patches=False))
    result = pipe.generate(image, PROMPT, image_options=_options(split=False))
    assert result.token_ids == expected


def test_first_logits_match_pytorch(model, capsys):
    variant, _, pipe, ref = model
    image = _image('wide')
    inputs = ref.inputs(image, PROMPT)
    request = pipe.family.prepare(to_rgb(image), PROMPT)
    features = pipe.vision.run(request.vision_inputs)
    _, logits = pipe.decoder.start(request.input_ids, features, request.image_token_id)
    diff = float(np.abs(logits[0] - ref.first_logits(inputs)).max())
    with capsys.disabled():
        print(f'\n[internvl {variant}] first-step logits max diff {diff:g}')
    assert diff <= 1e-3


def test_image_features_match_get_image_features(model):
    _, _, pipe, ref = model
    inputs = ref.inputs(_image('tall'), PROMPT)
    with torch.no_grad():
        expected = ref.model.model.get_image_features(
            pixel_values=inputs['pixel_values'], return_dict=True).pooler_output.numpy()
    features = pipe.vision.run({'pixel_values': inputs['pixel_values'].numpy()})
    assert features.shape == (expected.shape[0] * expected.shape[1], expected.shape[2])
    assert np.abs(features - expected.reshape(features.shape)).max() <= 1e-4


def test_text_only_and_system_prompt_match_transformers(model):
    _, _, pipe, ref = model
    expected = ref.generate(ref.inputs(None, 'Hello there.'))
    assert pipe.generate(None, 'Hello there.').token_ids == expected
    image = _image('small')
    inputs = ref.inputs(image, PROMPT, 'Answer briefly.')
    ours = pipe.family.prepare(to_rgb(image), PROMPT, 'Answer briefly.')
    assert ours.input_ids.tolist() == inputs['input_ids'][0].tolist()
    result = pipe({'prompt': PROMPT, 'image': image, 'system_prompt': 'Answer briefly.'})
    assert result.token_ids == ref.generate(inputs)


@pytest.mark.parametrize('case', ['two_images', 'history'])
def test_several_images_and_history_match_transformers(model, case):
    """Two images in one question and a 2-turn conversation, laid out as the processor does."""
    _, _, pipe, ref = model
    images = [_image('wide'), _image('small', seed=3)] if case == 'two_images' else \
        [_image('tall')]
    history = ('What is it?', 'A robot arm on a table.') if case == 'history' else ()
    ref.check(pipe, images, PROMPT, history)


def test_image_tokens_typed_by_the_user_stay_text(model):
    _, _, pipe, _ = model
    family = pipe.family
    request = family.prepare(to_rgb(_image('small')), 'What is <IMG_CONTEXT></img>?')
    assert request.num_image_tokens == family.image_seq_length
    assert int(np.count_nonzero(request.input_ids == family.end_image_token_id)) == 1


def test_family_constants_come_from_the_files(model):
    variant, model_dir, pipe, ref = model
    family = pipe.family
    assert isinstance(family, InternVLFamily)
    assert family.vision_input_names == ('pixel_values',)
    config = ref.model.config
    assert family.image_token_id == config.image_token_id
    assert family.image_seq_length == ref.processor.image_seq_length
    assert family.text_hidden_size == config.text_config.hidden_size
    assert family.context_length == config.text_config.max_position_embeddings
    assert set(family.eos_token_ids) == {
        ref.processor.tokenizer.convert_tokens_to_ids('<|im_end|>'),
        ref.processor.tokenizer.convert_tokens_to_ids('<|endoftext|>')}
    assert family.tile_size == config.vision_config.image_size[0]


def test_int8_graphs_run(model, capsys):
    variant, model_dir, pipe, _ = model
    int8 = vlm_ros.pipeline(model_dir, variant='int8', max_new_tokens=4)
    kinds = ['small', 'wide', 'tall', 'square', 'tiny', 'photo']
    agree = 0
    for i, kind in enumerate(kinds):
        image = _image(kind, seed=i)
        q = int8.generate(image, PROMPT)
        assert len(q.token_ids) >= 1
        agree += q.token_ids[0] == pipe.generate(image, PROMPT, max_new_tokens=1).token_ids[0]
    with capsys.disabled():
        print(f'\n[internvl int8 variant {variant}] first greedy token equals fp32 on '
              f'{agree}/{len(kinds)} images')


def test_image_seq_length_mismatch_is_reported(tmp_path):
    model_dir = cached_internvl_model('a')
    copy = tmp_path / 'model'
    shutil.copytree(model_dir, copy, ignore=shutil.ignore_patterns('onnx', '*.safetensors'))
    (copy / 'processor_config.json').write_text(json.dumps({'image_seq_length': 99}))
    with pytest.raises(ModelMismatchError, match='image_seq_length'):
        load_family(copy)


def _chat_layout(model_dir, out_dir):
    """Rewrite a tiny -hf model directory in the original remote-code layout."""
    os.makedirs(out_dir / 'onnx')
    for name in os.listdir(os.path.join(model_dir, 'onnx')):
        os.symlink(os.path.join(model_dir, 'onnx', name), out_dir / 'onnx' / name)
    for name in ('tokenizer.json', 'special_tokens_map.json', 'generation_config.json'):
        shutil.copy(os.path.join(model_dir, name), out_dir / name)
    with open(os.path.join(model_dir, 'config.json'), encoding='utf-8') as f:
        hf = json.load(f)
    with open(os.path.join(model_dir, 'preprocessor_config.json'), encoding='utf-8') as f:
        pre = json.load(f)
    with open(os.path.join(model_dir, 'tokenizer_config.json'), encoding='utf-8') as f:
        tok = json.load(f)
    for key in ('extra_special_tokens', 'start_image_token', 'end_image_token',
                'context_image_token', 'video_token', 'processor_class'):
        tok.pop(key, None)
    tok['chat_template'] = CHAT_TEMPLATE
    (out_dir / 'tokenizer_config.json').write_text(json.dumps(tok))
    vision = dict(hf['vision_config'], image_size=hf['vision_config']['image_size'][0],
                  patch_size=hf['vision_config']['patch_size'][0],
                  architectures=['InternVisionModel'])
    llm = dict(hf['text_config'], architectures=['Qwen2ForCausalLM'])
    config = {
        'architectures': ['InternVLChatModel'], 'model_type': 'internvl_chat',
        'downsample_ratio': hf['downsample_ratio'], 'dynamic_image_size': True,
        'force_image_size': pre['size']['height'], 'llm_config': llm,
        'max_dynamic_patch': pre['max_patches'], 'min_dynamic_patch': pre['min_patches'],
        'ps_version': 'v2', 'select_layer': -1, 'template': 'internvl2_5',
        'use_thumbnail': True, 'vision_config': vision,
    }
    (out_dir / 'config.json').write_text(json.dumps(config))
    return out_dir


@pytest.mark.parametrize('kind', ['small', 'wide', 'square'])
def test_remote_code_layout(model, kind, tmp_path):
    variant, model_dir, _, ref = model
    chat_dir = _chat_layout(model_dir, tmp_path / 'chat')
    pipe = vlm_ros.pipeline(chat_dir, max_new_tokens=NEW_TOKENS)
    family = pipe.family
    assert family.name == 'internvl_chat'
    assert family.image_seq_length == ref.processor.image_seq_length
    image = _image(kind, seed=4)
    request = family.prepare(to_rgb(image), PROMPT)
    # Same tiling as the -hf processor (same algorithm, ImageNet mean / std, bicubic).
    inputs = ref.inputs(image, PROMPT)
    pixels = inputs['pixel_values'].numpy()
    assert np.abs(request.vision_inputs['pixel_values'] - pixels).max() <= 1e-4
    # model.chat's query: system turn, '<image>\n' + question, image tokens in place.
    tiles = pixels.shape[0]
    query = (f'<|im_start|>system\n{CHAT_SYSTEM}<|im_end|>\n<|im_start|>user\n<img>'
             + '<IMG_CONTEXT>' * (family.image_seq_length * tiles)
             + f'</img>\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n')
    assert request.prompt_text == query
    ids = ref.processor.tokenizer(query, return_tensors='pt')['input_ids']
    assert request.input_ids.tolist() == ids[0].tolist()
    expected = ref.generate({'input_ids': ids, 'attention_mask': torch.ones_like(ids),
                             'pixel_values': inputs['pixel_values']})
    assert pipe.generate(image, PROMPT).token_ids == expected
    single = family.prepare(to_rgb(image), PROMPT, image_options=_options(split=False))
    assert single.vision_inputs['pixel_values'].shape[0] == 1
    # Several images are numbered, one per line, as in the model card's multi-image chat.
    two = family.prepare([image, _image('small')], PROMPT,
                         image_options=_options(split=False))
    block = '<img>' + '<IMG_CONTEXT>' * family.image_seq_length + '</img>'
    assert f'user\nImage-1: {block}\nImage-2: {block}\n{PROMPT}<|im_end|>' in two.prompt_text


@pytest.fixture(scope='module')
def gguf_pipes(model):
    """Our ONNX vision encoder feeding the Qwen2 language model as f32 / Q8_0 / Q4_0 GGUFs."""
    pytest.importorskip('llama_cpp')
    from vlm_ros_tools.gguf_export import cached_internvl_gguf
    variant, model_dir, _, _ = model
    pipes = {ftype: vlm_ros.pipeline(model_dir, decoder_model=cached_internvl_gguf(variant, ftype),
                                     max_new_tokens=NEW_TOKENS)
             for ftype in ('f32', 'q8_0', 'q4_0')}
    # Token-exact comparisons need an f32 KV cache: llama.cpp's default f16 cache (with CPU
    # flash attention) moves logits by ~1e-2, enough to flip near-tied tokens.
    pipes['exact'] = vlm_ros.pipeline(model_dir, kv_type='f32', max_new_tokens=NEW_TOKENS,
                                      decoder_model=cached_internvl_gguf(variant, 'f32'))
    return pipes


def test_llamacpp_two_images_and_history_match_transformers(model, gguf_pipes):
    _, _, _, ref = model
    images = [_image('wide'), _image('small', seed=3)]
    history = ('What is it?', 'A robot arm on a table.')
    for imgs, hist in ((images, ()), (images[:1], history)):
        expected = ref.generate(ref.inputs(imgs, PROMPT, history=hist))
        assert gguf_pipes['exact'].generate(imgs, PROMPT, history=hist).token_ids == expected


@pytest.mark.parametrize('kind', ['small', 'wide', 'tall', 'square'])
def test_llamacpp_decoder_matches_transformers(model, gguf_pipes, kind):
    variant, _, _, ref = model
    image = _image(kind, seed=1)
    expected = ref.generate(ref.inputs(image, PROMPT))
    result = gguf_pipes['exact'].generate(image, PROMPT)
    assert result.token_ids == expected, f'variant {variant}, {kind}: llama.cpp diverged'


def test_llamacpp_first_logits_match_pytorch(model, gguf_pipes):
    from vlm_ros.engine.runtimes.llamacpp import LlamaCppDecoder
    from vlm_ros_tools.gguf_export import cached_internvl_gguf
    variant, _, pipe, ref = model
    image = _image('wide')
    request = pipe.family.prepare(to_rgb(image), PROMPT)
    features = pipe.vision.run(request.vision_inputs)
    # An f32 KV cache (llama.cpp's default is f16) so that only float rounding differs.
    exact = LlamaCppDecoder(cached_internvl_gguf(variant, 'f32'), kv_type='f32')
    _, logits = exact.start(request.input_ids, features, request.image_token_id)
    expected = ref.first_logits(ref.inputs(image, PROMPT))
    assert np.abs(logits[0] - expected).max() <= 1e-3
    # The default settings (f16 KV cache) promise closeness, not exactness.
    _, default = gguf_pipes['f32'].decoder.start(request.input_ids, features,
                                                 request.image_token_id)
    assert np.abs(default[0] - expected).max() <= 0.1


def test_quantized_ggufs_run(model, gguf_pipes):
    """
    Q8_0's first logits stay near f32's; Q4_0 answers.

    Not the greedy token itself: a random model's top two logits are often closer than
    Q8_0's rounding moves them (seen: 0.03-0.1 apart, moved by up to 0.6), so which images
    agree changes with any change of the features.
    """
    variant = model[0]
    for i, kind in enumerate(['small', 'wide', 'tall', 'square', 'tiny', 'photo']):
        image = _image(kind, seed=i)
        request = gguf_pipes['f32'].family.prepare(to_rgb(image), PROMPT)
        features = gguf_pipes['f32'].vision.run(request.vision_inputs)
        logits = {}
        for ftype in ('f32', 'q8_0'):
            session, first = gguf_pipes[ftype].decoder.start(
                request.input_ids, features, request.image_token_id)
            logits[ftype] = np.asarray(first[0], dtype=np.float64)
            session.close()
        exact, quantized = logits['f32'], logits['q8_0']
        error = np.linalg.norm(quantized - exact) / np.linalg.norm(exact - exact.mean())
        assert error <= 0.15, f'variant {variant}, {kind}: Q8_0 logits off by {error:.3f}'
        rank = int((quantized > quantized[exact.argmax()]).sum())
        assert rank < 5, f'variant {variant}, {kind}: f32 greedy token ranks {rank} in Q8_0'
        assert gguf_pipes['q4_0'].generate(image, PROMPT, max_new_tokens=8).completion_tokens
