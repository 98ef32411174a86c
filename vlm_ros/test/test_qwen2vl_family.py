"""
The Qwen2-VL / Qwen2.5-VL family against transformers: pixels, prompt ids and M-RoPE positions.

Tiny random-weight Qwen2VLForConditionalGeneration and Qwen2_5_VLForConditionalGeneration
checkpoints in the hub repositories' file layout come from the test tooling; the reference is
transformers' processor (the PIL Qwen2-VL image processor) and the model's own
``get_rope_index``. Also here: the registry's view of the family and its two checkpoint
variants, their grounding questions and box conventions, the published files' other layouts,
and the errors a broken model folder gives.
"""

import json
import os
import shutil

import numpy as np
from PIL import Image
import pytest

from reference import Reference
from vlm_ros.engine import grounding
from vlm_ros.engine.chat_template import ChatTemplate, load_chat_template
from vlm_ros.engine.datatypes import Box
from vlm_ros.engine.errors import (ImageError, ModelFilesError, ModelMismatchError,
                                   UnsupportedModelError)
from vlm_ros.engine.families import load_family, registry
from vlm_ros.engine.families.qwen2_vl import (FALLBACK_CHAT_TEMPLATE, IMAGE_PLACEHOLDER,
                                              patchify, Qwen2VLFamily, rope_positions)

torch = pytest.importorskip('torch')
pytest.importorskip('transformers')
os.environ.setdefault('HF_HUB_OFFLINE', '1')

from vlm_ros_tools import model_cache  # noqa: E402
from vlm_ros_tools.qwen2vl_factory import load_processor, model_class  # noqa: E402

VARIANTS = ('qwen2-a', 'qwen2-b', 'qwen25-a', 'qwen25-b')
PROMPT = 'Describe this image.'
# (width, height) against the tiny models' budget: 4 to 48 merged 28x28 squares.
SIZES = {'square': (100, 100), 'wide': (300, 100), 'tall': (90, 250),
         'tiny': (20, 30),      # below min_pixels: scaled up
         'large': (640, 480),   # above max_pixels: scaled down
         'odd': (131, 77)}


def _image(kind, seed=0):
    rng = np.random.default_rng(seed)
    w, h = SIZES[kind]
    # Smooth gradients plus noise: the resampling filter matters, as on a real photo.
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1)
    return np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope='module', params=VARIANTS)
def model(request):
    """(variant, model_dir, our family, the reference) per tiny checkpoint."""
    model_dir = model_cache.cached_qwen2vl_model(request.param)
    ref = Reference(model_dir, model_class(request.param).__name__, load_processor)
    return request.param, model_dir, load_family(model_dir), ref


def _rope_index(ref, inputs):
    """Positions [3, seq] from the model's own ``get_rope_index``."""
    with torch.no_grad():
        positions, _ = ref.model.model.get_rope_index(
            inputs['input_ids'], mm_token_type_ids=inputs['mm_token_type_ids'],
            image_grid_thw=inputs.get('image_grid_thw'),
            attention_mask=inputs['attention_mask'])
    return positions[:, 0].numpy()


def _assert_same_request(ours, inputs, ref):
    """Ids, pixels, grids and positions equal the processor's and the model's."""
    assert ours.input_ids.tolist() == inputs['input_ids'][0].tolist()
    assert ours.num_image_tokens == int((inputs['mm_token_type_ids'] == 1).sum())
    if 'pixel_values' not in inputs:
        assert ours.vision_inputs == {}
        assert (ours.positions == np.arange(ours.input_ids.size)).all()
        return 0.0
    pixels, ref_pixels = ours.vision_inputs['pixel_values'], inputs['pixel_values'].numpy()
    assert pixels.dtype == np.float32 and pixels.shape == ref_pixels.shape
    grid = ours.vision_inputs['image_grid_thw']
    assert grid.dtype == np.int64 and grid.tolist() == inputs['image_grid_thw'].tolist()
    assert ours.positions.dtype == np.int64
    assert ours.positions.tolist() == _rope_index(ref, inputs).tolist()
    return float(np.abs(pixels - ref_pixels).max())


# -- preprocessing and layout against transformers ----------------------------------------------

@pytest.mark.parametrize('kind', list(SIZES))
def test_one_image_matches_the_processor(model, kind, capsys):
    variant, _, family, ref = model
    image = _image(kind)
    inputs = ref.inputs(Image.fromarray(image), PROMPT)
    ours = family.prepare(image, PROMPT)
    diff = _assert_same_request(ours, inputs, ref)
    with capsys.disabled():
        print(f'\n[qwen2vl {variant}] {kind} {SIZES[kind]}: grid '
              f'{inputs["image_grid_thw"][0].tolist()}, max pixel diff {diff:g}')
    assert diff <= 1e-6
    _, grid_h, grid_w = inputs['image_grid_thw'][0].tolist()
    assert ours.seen_sizes == [(grid_w * family.patch_size, grid_h * family.patch_size)]
    assert ours.image_token_counts == [grid_h * grid_w // family.merge_size ** 2]


@pytest.mark.parametrize('case', ['two_images', 'text_history', 'image_history', 'text_only',
                                  'system_prompt'])
def test_layouts_match_the_processor(model, case):
    """Several images, earlier turns (text, or showing an image), no image, a system turn."""
    _, _, family, ref = model
    wide, tall, odd = _image('wide', 1), _image('tall', 2), _image('odd', 3)
    images, history, system = [tall], (), ''
    if case == 'two_images':
        images = [wide, odd]
    elif case == 'text_history':
        history = ('What is it?', 'A robot arm on a table.')
    elif case == 'image_history':
        history = ({'text': 'What is it?', 'images': [Image.fromarray(wide)]},
                   'A robot arm on a table.')
    elif case == 'text_only':
        images = []
    else:
        system = 'Answer briefly.'
    inputs = ref.inputs([Image.fromarray(i) for i in images], PROMPT, system, history)
    ours = family.prepare(images, PROMPT, system, history=history)
    assert _assert_same_request(ours, inputs, ref) <= 1e-6
    assert len(ours.seen_sizes) == len(ours.images)


def test_cached_images_keep_their_place(model):
    """Skipped (cached) images are laid out and positioned, only the others preprocessed."""
    _, _, family, ref = model
    images = [_image('wide', 1), _image('odd', 3)]
    full = family.prepare(images, PROMPT)
    cached = family.prepare(images, PROMPT, skip={0})
    assert cached.input_ids.tolist() == full.input_ids.tolist()
    assert (cached.positions == full.positions).all()
    assert cached.seen_sizes == full.seen_sizes
    assert cached.image_inputs[0] == {}
    second = full.image_inputs[1]
    for name in ('pixel_values', 'image_grid_thw'):
        assert (cached.vision_inputs[name] == second[name]).all()
    assert cached.image_token_counts == full.image_token_counts


def test_family_constants_come_from_the_files(model):
    _, _, family, ref = model
    config = ref.model.config
    assert isinstance(family, Qwen2VLFamily)
    assert family.image_token_id == config.image_token_id
    assert family.vision_start_token_id == config.vision_start_token_id
    assert family.text_hidden_size == config.text_config.hidden_size
    assert family.context_length == config.text_config.max_position_embeddings
    assert family.mrope_section == list(config.text_config.rope_parameters['mrope_section'])
    assert set(family.eos_token_ids) == set(ref.eos)
    assert family.vision_heads == family.vision_hidden_size == 0
    image_processor = ref.processor.image_processor
    assert type(image_processor).__name__ == 'Qwen2VLImageProcessorPil'
    assert (family.min_pixels, family.max_pixels) == (image_processor.size['shortest_edge'],
                                                      image_processor.size['longest_edge'])


def test_image_tokens_typed_by_the_user_stay_text(model):
    _, _, family, _ = model
    request = family.prepare(_image('square'), f'What is {IMAGE_PLACEHOLDER}?')
    assert request.num_image_tokens == request.image_token_counts[0]
    assert int((request.input_ids == family.vision_start_token_id).sum()) == 1


# -- M-RoPE positions ----------------------------------------------------------------------------

def test_rope_positions_by_hand():
    # 2 text tokens, a 4x6 patch grid (2x3 merged), 2 text tokens.
    ids = [5, 6, 9, 9, 9, 9, 9, 9, 7, 8]
    positions = rope_positions(ids, [(1, 4, 6)], image_token_id=9, merge_size=2)
    assert positions.tolist() == [[0, 1, 2, 2, 2, 2, 2, 2, 5, 6],
                                  [0, 1, 2, 2, 2, 3, 3, 3, 5, 6],
                                  [0, 1, 2, 3, 4, 2, 3, 4, 5, 6]]
    assert rope_positions([1, 2, 3], [], 9).tolist() == [[0, 1, 2]] * 3
    assert rope_positions([], [], 9).shape == (3, 0)


@pytest.mark.parametrize('ids, grids, message', [
    ([1, 9, 9, 2], [(1, 2, 2)], r'do not fill the grid \(1, 2, 2\)'),
    ([1, 9, 2], [], 'no grid left'),
    ([1, 2], [(1, 2, 2)], '1 image grid'),
])
def test_rope_positions_refuse_a_mismatch(ids, grids, message):
    with pytest.raises(ValueError, match=message):
        rope_positions(ids, grids, image_token_id=9, merge_size=2)


def test_patchify_orders_merge_blocks_first():
    # Channel c, row y, column x holds 100 * c + 10 * y + x; patches of 1, blocks of 2x2.
    c, y, x = np.mgrid[0:3, 0:4, 0:4]
    patches = patchify((100 * c + 10 * y + x).astype(np.float32), 1, 2, 2)
    assert patches.shape == (16, 6)
    # The first block is rows 0-1, columns 0-1; each patch repeats its values per frame.
    assert patches[:4, ::2].tolist() == [[0, 100, 200], [1, 101, 201], [10, 110, 210],
                                         [11, 111, 211]]
    assert (patches[:, 0::2] == patches[:, 1::2]).all()
    assert patches[4, 0] == 2  # the second block starts at column 2
    with pytest.raises(ImageError, match='does not cut'):
        patchify(np.zeros((3, 4, 6), np.float32), 1, 4, 2)


# -- registry and per-checkpoint declarations ---------------------------------------------------

def test_registry_finds_the_family():
    cls = registry.by_key('qwen2_vl')
    assert cls is Qwen2VLFamily
    assert registry.by_param(2) is cls
    assert registry.by_config_type('qwen2_vl') is cls
    assert registry.by_config_type('qwen2_5_vl') is cls
    assert registry.by_projector('qwen2vl_merger') is cls
    assert registry.by_projector('qwen2.5vl_merger') is cls
    assert '2: Qwen2-VL/Qwen2.5-VL' in registry.param_help()
    assert cls.info.image_placeholder == IMAGE_PLACEHOLDER
    assert cls.info.fallback_chat_template == FALLBACK_CHAT_TEMPLATE
    # Other families keep the default placeholder and one declaration for all checkpoints.
    smolvlm = registry.by_key('smolvlm')
    assert smolvlm.info.image_placeholder == '<image>'
    assert smolvlm.info_for('smolvlm') is smolvlm.info


@pytest.mark.parametrize('source, box_format, prompt', [
    ('qwen2_vl', grounding.NORMALIZED_1000, grounding.QWEN2VL_PROMPT),
    ('qwen2vl_merger', grounding.NORMALIZED_1000, grounding.QWEN2VL_PROMPT),
    ('qwen2_5_vl', grounding.ABSOLUTE, grounding.QWEN25VL_PROMPT),
    ('qwen2.5vl_merger', grounding.ABSOLUTE, grounding.QWEN25VL_PROMPT),
])
def test_info_for_each_checkpoint(source, box_format, prompt):
    info = Qwen2VLFamily.info_for(source)
    assert (info.box_format, info.grounding_prompt) == (box_format, prompt)
    # The variants are the same family to the registry.
    base = Qwen2VLFamily.info
    assert (info.key, info.model_type_param, info.config_model_types, info.mmproj_projectors,
            info.image_placeholder) == (base.key, base.model_type_param,
                                        base.config_model_types, base.mmproj_projectors,
                                        base.image_placeholder)
    assert Qwen2VLFamily.info_for('something else') is base


def test_each_checkpoint_declares_its_variant(model):
    variant, _, family, _ = model
    expected = 'qwen2_vl' if variant.startswith('qwen2-') else 'qwen2_5_vl'
    assert family.name == expected
    assert family.info is Qwen2VLFamily.info_for(expected)


# -- grounding -----------------------------------------------------------------------------------

def test_grounding_questions_per_variant():
    qwen2 = grounding.prompts(Qwen2VLFamily.info_for('qwen2_vl').grounding_prompt,
                              ['cup', 'red chair'])
    assert qwen2 == [('cup', 'Find <|object_ref_start|>cup<|object_ref_end|>'),
                     ('red chair', 'Find <|object_ref_start|>red chair<|object_ref_end|>')]
    qwen25 = grounding.prompts(Qwen2VLFamily.info_for('qwen2_5_vl').grounding_prompt,
                               ['cup', 'red chair'])
    assert len(qwen25) == 1 and qwen25[0][0] == ''
    assert 'cup, red chair' in qwen25[0][1] and '"bbox_2d"' in qwen25[0][1]
    assert 'None' in qwen25[0][1]


@pytest.mark.parametrize('answer', ['None', 'None.', ' None\n', '[]', '```json\n[]\n```'])
def test_an_answer_of_none_has_no_boxes(answer):
    assert grounding.parse(answer) == grounding.Parsed([], 0)
    found = grounding.locate(answer, grounding.ABSOLUTE, (640, 480), (644, 476))
    assert (found.boxes, found.dropped) == ([], 0)


def test_grounding_question_and_answer_tokens(model):
    """Qwen2-VL's markers are tokens in its question and stay in its decoded answer."""
    variant, _, family, _ = model
    info = family.info
    question = grounding.prompts(info.grounding_prompt, ['cup'])[0][1]
    request = family.prepare(_image('large'), question)
    marker = family.tokenizer.token_to_id('<|object_ref_start|>')
    answer = ('<|object_ref_start|>cup<|object_ref_end|><|box_start|>(100,200),(300,400)'
              '<|box_end|>')
    ids = family.tokenizer.encode(answer, add_special_tokens=False) + family.eos_token_ids[:1]
    if info.box_format == grounding.NORMALIZED_1000:
        assert marker in request.input_ids.tolist()
        assert family.decode(ids) == answer
        found = grounding.locate(family.decode(ids), info.box_format, (640, 480))
        assert found.boxes == [Box('cup', 64, 96, 192, 192)]
    else:
        # Qwen2.5-VL's question holds no markers; typed ones are text, as any special token.
        assert marker not in request.input_ids.tolist()
        assert marker not in family.prepare(_image('large'), answer).input_ids.tolist()
        assert family.decode(ids) == 'cup(100,200),(300,400)'
        # Its JSON boxes are in pixels of the image it saw: scaled to the original size.
        seen = request.seen_sizes[0]
        assert seen == (224, 168)
        text = '```json\n[{"bbox_2d": [56, 42, 112, 84], "label": "cup"}]\n```'
        found = grounding.locate(text, info.box_format, (640, 480), seen)
        assert found.boxes == [Box('cup', 160, 120, 320, 240)]
    assert family.decode(ids, skip_special_tokens=False).startswith(answer)


# -- chat templates ------------------------------------------------------------------------------

def test_fallback_template_renders_as_the_published_one():
    model_dir = model_cache.cached_qwen2vl_model('qwen2-a')
    published = ChatTemplate(load_chat_template(model_dir))
    fallback = ChatTemplate(FALLBACK_CHAT_TEMPLATE)
    image, text = {'type': 'image'}, {'type': 'text', 'text': 'Hi.'}
    conversations = [
        [{'role': 'user', 'content': [image, text]}],
        [{'role': 'user', 'content': [text]}],
        [{'role': 'system', 'content': [{'type': 'text', 'text': 'Be brief.'}]},
         {'role': 'user', 'content': [image, image, text]}],
        [{'role': 'user', 'content': [image, text]},
         {'role': 'assistant', 'content': [{'type': 'text', 'text': 'A cup.'}]},
         {'role': 'user', 'content': [text]}],
        [{'role': 'user', 'content': 'plain string'}],
    ]
    for messages in conversations:
        for generation in (True, False):
            assert fallback.render(messages, generation) == \
                published.render(messages, generation)


def _copy(model_dir, tmp_path):
    copy = tmp_path / 'model'
    shutil.copytree(model_dir, copy, ignore=shutil.ignore_patterns('*.safetensors'))
    return copy


def _edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_published_file_layouts(tmp_path):
    """rope_scaling at the top level, min/max pixels at the top level, a .jinja template."""
    model_dir = model_cache.cached_qwen2vl_model('qwen25-a')
    expected = load_family(model_dir).prepare(_image('large'), PROMPT)
    copy = _copy(model_dir, tmp_path)

    def flatten(config):
        text = config.pop('text_config')
        rope = text.pop('rope_parameters')
        config.update({k: v for k, v in text.items() if k != 'model_type'})
        config['rope_scaling'] = {'type': 'mrope', 'mrope_section': rope['mrope_section']}
    _edit_json(copy / 'config.json', flatten)
    _edit_json(copy / 'preprocessor_config.json',
               lambda p: [p.pop(k) for k in ('resample', 'rescale_factor', 'do_resize')])
    template = json.loads((copy / 'chat_template.json').read_text())['chat_template']
    (copy / 'chat_template.json').unlink()
    _edit_json(copy / 'tokenizer_config.json', lambda t: t.pop('chat_template'))
    (copy / 'chat_template.jinja').write_text(template)
    family = load_family(copy)
    assert family.mrope_section == [2, 3, 3] and family.context_length == 4096
    ours = family.prepare(_image('large'), PROMPT)
    assert ours.input_ids.tolist() == expected.input_ids.tolist()
    assert (ours.vision_inputs['pixel_values'] == expected.vision_inputs['pixel_values']).all()

    # size.shortest_edge / longest_edge alone, and a processor_config.json nesting them.
    def size_only(p):
        p['size'] = {'shortest_edge': p.pop('min_pixels'), 'longest_edge': p.pop('max_pixels')}
    _edit_json(copy / 'preprocessor_config.json', size_only)
    assert (load_family(copy).min_pixels, load_family(copy).max_pixels) == (3136, 37632)
    nested = dict(json.loads((copy / 'preprocessor_config.json').read_text()),
                  size={'shortest_edge': 3136, 'longest_edge': 28 * 28 * 8})
    (copy / 'processor_config.json').write_text(json.dumps({'image_processor': nested}))
    small = load_family(copy).prepare(_image('large'), PROMPT)
    # 640x480 in 8 merged squares: 56x84 pixels.
    assert small.vision_inputs['image_grid_thw'].tolist() == [[1, 4, 6]]
    assert small.seen_sizes == [(84, 56)]


# -- errors --------------------------------------------------------------------------------------

def test_template_without_image_placeholder_is_reported(tmp_path):
    copy = _copy(model_cache.cached_qwen2vl_model('qwen2-a'), tmp_path)
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for p in m['content'] %}"
                "{% if p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %}"
                '<|im_end|>\n{% endfor %}<|im_start|>assistant\n')
    (copy / 'chat_template.json').write_text(json.dumps({'chat_template': template}))
    family = load_family(copy)
    assert family.prepare(None, PROMPT).num_image_tokens == 0
    with pytest.raises(UnsupportedModelError,
                       match=r'wrote 0 <\|image_pad\|> placeholders for 1 image\(s\)'):
        family.prepare(_image('square'), PROMPT)


@pytest.mark.parametrize('file, change, error, message', [
    ('config.json', lambda c: c.update(image_token_id=5), ModelMismatchError,
     'config.json says image_token_id 5'),
    ('config.json', lambda c: c['vision_config'].update(spatial_merge_size=4),
     ModelMismatchError, 'merge_size 2 but config.json vision_config.spatial_merge_size is 4'),
    ('config.json', lambda c: c['text_config'].pop('rope_parameters'), ModelFilesError,
     'mrope_section'),
    ('config.json', lambda c: c.update(model_type='llava'), UnsupportedModelError,
     "model_type 'llava'"),
    ('preprocessor_config.json', lambda p: p.update(min_pixels=0), ModelFilesError,
     'min_pixels .* must be a positive int, got 0'),
    ('preprocessor_config.json', lambda p: p.update(min_pixels=10 ** 6), ModelFilesError,
     'min_pixels 1000000 exceeds max_pixels 37632'),
    ('preprocessor_config.json', lambda p: p.update(size=[1, 2]), ModelFilesError,
     'size must be a dict'),
    ('preprocessor_config.json', lambda p: p.update(resample='sinc'), UnsupportedModelError,
     "resample 'sinc'"),
    ('preprocessor_config.json', lambda p: p.update(patch_size=0), ModelFilesError,
     'patch_size must be a positive int'),
])
def test_broken_model_files_are_reported(tmp_path, file, change, error, message):
    copy = _copy(model_cache.cached_qwen2vl_model('qwen2-a'), tmp_path)
    _edit_json(copy / file, change)
    with pytest.raises(error, match=message):
        Qwen2VLFamily(copy)


def test_images_the_processor_refuses(model):
    _, _, family, ref = model
    strip = np.zeros((2, 500, 3), np.uint8)
    with pytest.raises(ImageError, match='aspect ratio over 200'):
        family.prepare(strip, PROMPT)
    with pytest.raises(ValueError, match='aspect ratio'):
        ref.inputs(Image.fromarray(strip), PROMPT)
