"""
SmolVLM preprocessing, prompt layout and tokenizer against transformers; image input checks.

The reference is transformers' own SmolVLMProcessor (PIL image processor, tokenizer, chat
template) loaded from the tiny hub-style model directories the test tooling writes, for two
differently shaped configs (tile 64 / 16 image tokens / longest edge 256, and tile 96 / 9
image tokens / longest edge 384). transformers is imported only here, never by the engine.
"""

import io
import json
import os
import shutil

import numpy as np
from PIL import Image
import pytest

from vlm_ros.engine.chat_template import ChatTemplate, load_chat_template
from vlm_ros.engine.datatypes import ImageOptions
from vlm_ros.engine.errors import (ImageError, ModelFilesError, ModelMismatchError,
                                   UnsupportedModelError)
from vlm_ros.engine.families.idefics3 import Idefics3Family
from vlm_ros.engine.generation import TextStream
from vlm_ros.engine.images import MAX_SIDE, to_rgb
from vlm_ros.engine.tokenizer import Tokenizer

os.environ.setdefault('HF_HUB_OFFLINE', '1')

PROMPT = 'What is the robot doing?'
# The image sizes (width, height) of the parity cases.
SIZES = {'square': (160, 160), 'wide': (320, 120), 'tall': (100, 300), 'tiny': (7, 5),
         'gray': (150, 100), 'rgba': (120, 90), 'nosplit': (200, 130)}


def make_image(kind, seed=0):
    """Return a PIL test image: smooth gradients plus noise, as resampling sees a photo."""
    rng = np.random.default_rng(seed)
    w, h = SIZES[kind]
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1)
    pixels = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
    if kind == 'gray':
        return Image.fromarray(pixels).convert('L')
    if kind == 'rgba':
        alpha = rng.integers(0, 256, (h, w), dtype=np.uint8)
        return Image.fromarray(np.dstack([pixels, alpha]))
    return Image.fromarray(pixels)


class Tiny:
    """A tiny model directory with transformers' processor and our family for it."""

    def __init__(self, model_dir, variant):
        from vlm_ros_tools.smolvlm_factory import load_processor
        self.dir = str(model_dir)
        self.variant = variant
        self.processor = load_processor(self.dir)
        self.family = Idefics3Family(self.dir)

    def reference(self, image, prompt=PROMPT, **kwargs):
        """Run transformers' processor on the rendered chat prompt; numpy outputs."""
        content = ([{'type': 'image'}] if image is not None else []) + [
            {'type': 'text', 'text': prompt}]
        text = self.processor.apply_chat_template([{'role': 'user', 'content': content}],
                                                  add_generation_prompt=True)
        out = self.processor(text=text, images=[image] if image is not None else None,
                             return_tensors='np', **kwargs)
        if image is not None:
            # The processor drops the grid; its image processor reports it.
            grid = self.processor.image_processor(image, return_row_col_info=True, **kwargs)
            out['rows'], out['cols'] = grid['rows'], grid['cols']
        return out


@pytest.fixture(scope='module', params=['a', 'b'])
def tiny(request, tmp_path_factory):
    """Both tiny SmolVLM configs, built into a temporary directory."""
    pytest.importorskip('torch')
    pytest.importorskip('transformers')
    from vlm_ros_tools.smolvlm_factory import build_tiny_smolvlm
    model_dir = tmp_path_factory.mktemp(f'smolvlm_{request.param}')
    build_tiny_smolvlm(str(model_dir), request.param)
    return Tiny(model_dir, request.param)


@pytest.fixture(scope='module')
def tok_dir(tmp_path_factory):
    """Tokenizer files only (no transformers needed)."""
    from vlm_ros_tools import tiny_tokenizer
    out = tmp_path_factory.mktemp('tokenizer')
    tiny_tokenizer.write_tiny_tokenizer(str(out))
    return out


def assert_same_inputs(ours, ref, case=''):
    """Compare a PreparedRequest with the processor's output (pixels, mask, ids)."""
    pixels, mask = ours.vision_inputs['pixel_values'], ours.vision_inputs['pixel_attention_mask']
    assert pixels.dtype == np.float32 and mask.dtype == np.bool_
    assert pixels.shape == ref['pixel_values'].shape, case
    assert mask.shape == ref['pixel_attention_mask'].shape, case
    diff = float(np.abs(pixels - ref['pixel_values']).max())
    assert diff <= 1e-4, f'{case}: pixel_values differ by {diff}'
    assert np.array_equal(mask, ref['pixel_attention_mask'].astype(bool)), case
    assert ours.input_ids.dtype == np.int64
    assert ours.input_ids.tolist() == ref['input_ids'][0].tolist(), case
    return diff


# Image preprocessing and prompt expansion against SmolVLMProcessor.

@pytest.mark.parametrize('kind', ['square', 'wide', 'tall', 'tiny', 'gray', 'rgba'])
def test_matches_transformers(tiny, kind):
    """Pixels, mask and ids equal the processor's for each image shape and mode."""
    image = make_image(kind)
    ref = tiny.reference(image)
    ours = tiny.family.prepare(image, PROMPT)
    assert_same_inputs(ours, ref, f'{tiny.variant}/{kind}')
    rows, cols = ref['rows'][0][0], ref['cols'][0][0]
    frames = rows * cols + 1 if rows else 1
    assert ours.vision_inputs['pixel_values'].shape[1] == frames
    assert ours.num_image_tokens == frames * tiny.family.image_seq_len
    assert ours.image_token_id == tiny.processor.image_token_id
    assert int((ours.input_ids == ours.image_token_id).sum()) == ours.num_image_tokens
    if kind == 'wide':
        assert (rows, cols) == (2, 4)  # several tiles, row-major
        assert f'<row_2_col_4>{"<image>" * tiny.family.image_seq_len}' in ours.prompt_text


@pytest.mark.parametrize('kind', ['square', 'wide', 'tall'])
def test_threaded_resizing_matches_transformers(tiny, kind, monkeypatch):
    """With every resize split across threads (orders learnt), inputs stay exact."""
    from test_resize import wait_learnt
    from vlm_ros.engine import resize
    monkeypatch.setattr(resize, 'MIN_PIXELS', 0)
    monkeypatch.setattr(resize, '_workers', lambda: 2)
    monkeypatch.setattr(resize, '_orders', type(resize._orders)())
    image = make_image(kind)
    tiny.family.prepare(image, PROMPT)
    wait_learnt(resize)
    assert resize._orders and resize.PILLOW_ONLY not in resize._orders.values()
    assert_same_inputs(tiny.family.prepare(image, PROMPT), tiny.reference(image), kind)


@pytest.mark.parametrize('kind', ['gray', 'rgba'])
def test_array_inputs_match_pil(tiny, kind):
    """A grey or RGBA numpy array gives the same request as the PIL image it came from."""
    image = make_image(kind)
    from_pil = tiny.family.prepare(image, PROMPT)
    from_array = tiny.family.prepare(np.asarray(image), PROMPT)
    assert np.array_equal(from_pil.vision_inputs['pixel_values'],
                          from_array.vision_inputs['pixel_values'])
    assert from_pil.input_ids.tolist() == from_array.input_ids.tolist()


def test_splitting_disabled(tiny):
    """do_image_splitting=False: one square frame, same as the processor's."""
    image = make_image('nosplit')
    ref = tiny.reference(image, do_image_splitting=False)
    ours = tiny.family.prepare(image, PROMPT, image_options=ImageOptions(do_image_splitting=False))
    assert_same_inputs(ours, ref, 'nosplit')
    tile = tiny.family.tile_size
    assert ours.vision_inputs['pixel_values'].shape == (1, 1, 3, tile, tile)
    assert ours.num_image_tokens == tiny.family.image_seq_len


def test_splitting_enabled_explicitly_matches_default(tiny):
    """ImageOptions(do_image_splitting=True) is the config's own behaviour here."""
    image = make_image('wide')
    default = tiny.family.prepare(image, PROMPT)
    forced = tiny.family.prepare(image, PROMPT, ImageOptions(do_image_splitting=True))
    assert np.array_equal(default.vision_inputs['pixel_values'],
                          forced.vision_inputs['pixel_values'])


@pytest.mark.parametrize('cap', [1, 2, 4, 6, 9])
def test_max_tiles_equals_smaller_longest_edge(tiny, cap):
    """The cap picks the largest n * tile longest edge whose grid fits: check vs transformers."""
    image = make_image('square')  # 4 x 4 tiles uncapped
    tile = tiny.family.tile_size
    for n in range(4, 0, -1):
        ref = tiny.reference(image, size={'longest_edge': n * tile})
        rows, cols = ref['rows'][0][0], ref['cols'][0][0]
        if rows * cols <= cap:
            break
    ours = tiny.family.prepare(image, PROMPT, '', ImageOptions(max_tiles=cap))
    assert_same_inputs(ours, ref, f'max_tiles={cap}')
    assert ours.vision_inputs['pixel_values'].shape[1] - (1 if rows else 0) <= cap


def test_max_tiles_not_binding_is_exact(tiny):
    """A cap at or above the grid changes nothing; 0 means no cap."""
    image = make_image('wide')  # 2 x 4 tiles
    ref = tiny.reference(image)
    for cap in (0, 8, 100):
        assert_same_inputs(tiny.family.prepare(image, PROMPT, '', ImageOptions(max_tiles=cap)),
                           ref, f'max_tiles={cap}')
    with pytest.raises(ImageError, match='max_tiles'):
        tiny.family.prepare(image, PROMPT, '', ImageOptions(max_tiles=-1))


def test_single_frame_when_image_fits_one_tile(tiny, tmp_path):
    """With longest_edge == tile the split path keeps one frame and no row/col tokens."""
    model_dir = tmp_path / 'one_tile'
    shutil.copytree(tiny.dir, model_dir)
    path = model_dir / 'preprocessor_config.json'
    cfg = json.loads(path.read_text())
    cfg['size'] = {'longest_edge': tiny.family.tile_size}
    path.write_text(json.dumps(cfg))
    other = Tiny(model_dir, tiny.variant)
    image = make_image('tall')
    ref = other.reference(image)
    ours = other.family.prepare(image, PROMPT)
    assert_same_inputs(ours, ref, 'one tile')
    assert ours.vision_inputs['pixel_values'].shape[1] == 1
    assert '<row_1_col_1>' not in ours.prompt_text


def test_text_only_prompt(tiny):
    """prepare(None, prompt) tokenizes the chat prompt alone, like the processor."""
    ref = tiny.reference(None, 'Hello there, robot 42!')
    ours = tiny.family.prepare(None, 'Hello there, robot 42!')
    assert ours.vision_inputs == {}
    assert ours.num_image_tokens == 0
    assert ours.input_ids.tolist() == list(ref['input_ids'][0])
    assert ours.prompt_text.endswith('Assistant:')


def test_system_prompt_and_tokenized_chat(tiny):
    """A system turn renders and tokenizes as apply_chat_template(tokenize=True) does."""
    image = make_image('tall')
    messages = [{'role': 'system', 'content': [{'type': 'text', 'text': 'Be brief.'}]},
                {'role': 'user', 'content': [{'type': 'image', 'image': image},
                                             {'type': 'text', 'text': PROMPT}]}]
    ref = tiny.processor.apply_chat_template(messages, add_generation_prompt=True,
                                             tokenize=True, return_dict=True,
                                             return_tensors='np')
    ours = tiny.family.prepare(image, PROMPT, 'Be brief.')
    assert_same_inputs(ours, ref, 'system prompt')
    assert ours.prompt_text.startswith('<|im_start|>System: Be brief.<end_of_utterance>\n')


def test_special_tokens_in_user_text_stay_text(tiny):
    """User-typed <image> etc. are plain text, as with sanitize_control_tokens=True."""
    image = make_image('square')
    prompt = 'Is <image> a <end_of_utterance> token <|im_start|>?'
    messages = [{'role': 'user', 'content': [{'type': 'image', 'image': image},
                                             {'type': 'text', 'text': prompt}]}]
    ref = tiny.processor.apply_chat_template(messages, add_generation_prompt=True,
                                             tokenize=True, return_dict=True,
                                             sanitize_control_tokens=True)
    ours = tiny.family.prepare(image, prompt)
    assert ours.input_ids.tolist() == list(ref['input_ids'][0])
    frames = ours.vision_inputs['pixel_values'].shape[1]
    assert ours.num_image_tokens == frames * tiny.family.image_seq_len
    eou = tiny.family.tokenizer.token_to_id('<end_of_utterance>')
    assert ours.input_ids.tolist().count(eou) == 1  # only the template's own
    assert prompt in ours.prompt_text


def test_constants_from_files(tiny):
    """Every constant comes from the model directory's files."""
    from vlm_ros_tools import smolvlm_factory
    family = tiny.family
    with open(os.path.join(tiny.dir, 'config.json')) as f:
        config = json.load(f)
    with open(os.path.join(tiny.dir, 'generation_config.json')) as f:
        generation = json.load(f)
    spec = smolvlm_factory.variant_spec(tiny.variant)
    assert family.name == 'smolvlm'
    assert family.image_seq_len == smolvlm_factory.image_seq_len(tiny.variant)
    assert family.image_seq_len == tiny.processor.image_seq_len
    assert family.tile_size == spec['vision']['image_size']
    assert family.longest_edge == spec['tiles_per_edge'] * spec['vision']['image_size']
    assert family.resample == 1
    assert family.context_length == config['text_config']['max_position_embeddings']
    assert family.text_hidden_size == config['text_config']['hidden_size']
    assert family.eos_token_ids[:2] == generation['eos_token_id']
    assert set(family.eos_token_ids) == set(generation['eos_token_id'])
    assert family.image_token_id == config['image_token_id']
    tokenizer = tiny.processor.tokenizer
    assert family.fake_image_token_id == tokenizer.convert_tokens_to_ids(
        '<fake_token_around_image>')
    assert family.global_image_token_id == tokenizer.convert_tokens_to_ids('<global-img>')


def test_image_seq_len_computed_or_checked(tiny, tmp_path):
    """Without processor_config.json it is computed from config; a wrong one is refused."""
    model_dir = tmp_path / 'model'
    shutil.copytree(tiny.dir, model_dir)
    (model_dir / 'processor_config.json').unlink()
    assert Idefics3Family(model_dir).image_seq_len == tiny.family.image_seq_len
    (model_dir / 'processor_config.json').write_text(
        json.dumps({'image_seq_len': tiny.family.image_seq_len + 1}))
    with pytest.raises(ModelMismatchError, match='image_seq_len'):
        Idefics3Family(model_dir)


def test_bad_model_files(tiny, tmp_path):
    """Missing or inconsistent files fail with the file and value named."""
    model_dir = tmp_path / 'model'
    shutil.copytree(tiny.dir, model_dir)
    config_path = model_dir / 'config.json'
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, 'image_token_id': 3}))
    with pytest.raises(ModelMismatchError, match='image_token_id'):
        Idefics3Family(model_dir)
    config_path.write_text(json.dumps({**config, 'model_type': 'llava'}))
    with pytest.raises(UnsupportedModelError, match='llava'):
        Idefics3Family(model_dir)
    config_path.write_text(json.dumps(config))
    (model_dir / 'preprocessor_config.json').unlink()
    with pytest.raises(ModelFilesError, match='preprocessor_config.json'):
        Idefics3Family(model_dir)


def test_decode_matches_transformers(tiny):
    """decode() equals the HF tokenizer's decode, with and without special tokens."""
    ids = tiny.family.prepare(make_image('wide'), 'Grüße 🤖 robot 123?').input_ids.tolist()
    tokenizer = tiny.processor.tokenizer
    for skip in (True, False):
        assert tiny.family.decode(ids, skip) == tokenizer.decode(ids, skip_special_tokens=skip)


# Tokenizer wrapper.

TEXTS = ['Hello world', ' leading space and  double  spaces', 'digits 2024 and 3.14',
         'Grüße, 世界! 🤖', '<|im_start|>User:<image>Hi<end_of_utterance>\nAssistant:',
         'new\nlines\n\n and\ttabs', '']


def test_tokenizer_matches_transformers(tok_dir):
    """Encode, decode and token_to_id equal transformers' tokenizer for the same files."""
    transformers = pytest.importorskip('transformers')
    ref = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    ours = Tokenizer(tok_dir)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref(text)['input_ids'], text
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids, False) == ref.decode(ids, skip_special_tokens=False)
    assert ours.token_to_id('<image>') == ref.convert_tokens_to_ids('<image>')
    assert ours.token_to_id('<no such token>') is None
    assert ours.bos_token == ref.bos_token == '<|im_start|>'
    assert ours.eos_token == ref.eos_token
    assert ours.vocab_size == len(ref)
    # SmolVLM's tokenizer adds no BOS of its own: the chat template writes it.
    assert ours.encode('Hello')[0] != ours.token_to_id('<|im_start|>')


def test_tokenizer_bos_rules(tok_dir, tmp_path):
    """
    BOS comes from tokenizer.json's post-processor only, and never twice.

    transformers v5 ignores tokenizer_config's add_bos_token when tokenizer.json exists; a
    rendered prompt that already starts with BOS gets no second one (apply_chat_template).
    """
    transformers = pytest.importorskip('transformers')
    from tokenizers import processors
    from tokenizers import Tokenizer as RustTokenizer
    model_dir = tmp_path / 'bos'
    shutil.copytree(tok_dir, model_dir)
    path = model_dir / 'tokenizer_config.json'
    path.write_text(json.dumps({**json.loads(path.read_text()), 'add_bos_token': True}))
    ref = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    ours = Tokenizer(model_dir)
    bos = ours.token_to_id('<|im_start|>')
    assert ours.encode('Hello', add_special_tokens=True) == ref('Hello')['input_ids']
    assert bos not in ours.encode('Hello', add_special_tokens=True)

    rust = RustTokenizer.from_file(str(model_dir / 'tokenizer.json'))
    rust.post_processor = processors.TemplateProcessing(
        single='<|im_start|> $A', special_tokens=[('<|im_start|>', bos)])
    rust.save(str(model_dir / 'tokenizer.json'))
    ref = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    ours = Tokenizer(model_dir)
    assert ours.encode('Hello') == ref('Hello')['input_ids']
    assert ours.encode('Hello')[0] == bos
    prompt = '<|im_start|>User: Hi<end_of_utterance>\nAssistant:'
    assert ours.encode(prompt) == ref(prompt, add_special_tokens=False)['input_ids']
    assert ours.encode(prompt).count(bos) == 1
    assert ours.encode(prompt, add_special_tokens=True) == ref(prompt)['input_ids']


def test_tokenizer_missing_file(tmp_path):
    """No tokenizer.json: ModelFilesError naming it."""
    with pytest.raises(ModelFilesError, match='tokenizer.json'):
        Tokenizer(tmp_path)


# Streaming text (generation.TextStream).

def _stream(decode, ids, stop=()):
    """Feed ``ids`` one at a time; return (deltas, final text, where it stopped)."""
    deltas = []
    stream = TextStream(decode, stop, deltas.append)
    stopped_at = None
    for n in range(1, len(ids) + 1):
        if stream.update(ids[:n]):
            stopped_at = n
            break
    return deltas, stream.finish(), stopped_at


def test_text_stream_deltas_add_up(tok_dir):
    """Deltas fed id by id concatenate to decode(ids), multi-byte characters never split."""
    tokenizer = Tokenizer(tok_dir)
    text = 'The robot says: Grüße, 世界! 🤖🦾 done.\nCost: 3.50 €'
    ids = tokenizer.encode(text)
    deltas, final, _ = _stream(tokenizer.decode, ids)
    assert ''.join(deltas) == final == tokenizer.decode(ids) == text
    assert not any('\ufffd' in d for d in deltas)
    assert any('🤖' in d for d in deltas)


def test_text_stream_holds_partial_character(tok_dir):
    """Partial UTF-8 yields nothing until complete."""
    tokenizer = Tokenizer(tok_dir)
    ids = tokenizer.encode('🤖')
    assert len(ids) > 1  # byte-level pieces in the tiny vocabulary
    deltas = []
    stream = TextStream(tokenizer.decode, (), deltas.append)
    for n in range(1, len(ids)):
        stream.update(ids[:n])
    assert deltas == []
    stream.update(ids)
    assert deltas == ['🤖']


def test_text_stream_stop_strings_and_special_tokens(tok_dir):
    """Special tokens vanish when skipped; a stop string ends the text before it."""
    tokenizer = Tokenizer(tok_dir)
    ids = tokenizer.encode('Yes.<end_of_utterance>')
    deltas, final, _ = _stream(tokenizer.decode, ids)
    assert ''.join(deltas) == final == 'Yes.'
    kept, _, _ = _stream(lambda t: tokenizer.decode(t, False), ids)
    assert ''.join(kept) == 'Yes.<end_of_utterance>'
    ids = tokenizer.encode('red square. STOP here')
    deltas, final, stopped_at = _stream(tokenizer.decode, ids, stop=('STOP',))
    assert final == ''.join(deltas) == 'red square. ' and stopped_at < len(ids)


# Chat template.

def test_chat_template_lookup_order(tok_dir, tmp_path):
    """chat_template.json wins over chat_template.jinja, which wins over tokenizer_config."""
    model_dir = tmp_path / 'tpl'
    shutil.copytree(tok_dir, model_dir)
    cfg_path = model_dir / 'tokenizer_config.json'
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()),
                                    'chat_template': 'from tokenizer_config'}))
    (model_dir / 'chat_template.jinja').write_text('from jinja')
    assert load_chat_template(model_dir) != 'from jinja'  # chat_template.json present
    (model_dir / 'chat_template.json').unlink()
    assert load_chat_template(model_dir) == 'from jinja'
    (model_dir / 'chat_template.jinja').unlink()
    assert load_chat_template(model_dir) == 'from tokenizer_config'
    cfg_path.write_text('{}')
    with pytest.raises(ModelFilesError, match='no chat template'):
        load_chat_template(model_dir)


FANCY_TEMPLATE = (
    '{{ bos_token }}{% set ns = namespace(n=0) %}'
    '{% for m in messages %}{% if m.role == "stop" %}{% break %}{% endif %}'
    '{% set ns.n = ns.n + 1 %}{{ m.role | upper }}: {{ m.content | tojson }}\n'
    '{% generation %}[{{ ns.n }}]{% endgeneration %}\n{% endfor %}'
    '{% if add_generation_prompt %}  {{ "ASSISTANT:" }}{% endif %}{{ eos_token }}'
)


def test_chat_template_features_match_transformers():
    """namespace, loop controls, tojson, generation tag, trim/lstrip blocks, special tokens."""
    chat_utils = pytest.importorskip('transformers.utils.chat_template_utils')
    messages = [{'role': 'user', 'content': 'a "quoted" <b>é</b>'},
                {'role': 'assistant', 'content': [{'type': 'text', 'text': 'x'}]},
                {'role': 'stop', 'content': ''}, {'role': 'user', 'content': 'never'}]
    tokens = {'bos_token': '<s>', 'eos_token': '</s>'}
    ours = ChatTemplate(FANCY_TEMPLATE, tokens).render(messages, add_generation_prompt=True)
    ref, _ = chat_utils.render_jinja_template(conversations=[messages],
                                              chat_template=FANCY_TEMPLATE,
                                              add_generation_prompt=True, **tokens)
    assert ours == ref[0]
    assert '"a \\"quoted\\" <b>é</b>"' in ours and 'never' not in ours


def test_chat_template_raise_exception():
    """A template's raise_exception surfaces with its message."""
    template = ChatTemplate("{{ raise_exception('System role not supported') }}")
    with pytest.raises(UnsupportedModelError, match='System role not supported'):
        template.render([])


# to_rgb: conversions.

def test_rgb_uint8_passes_through():
    """A contiguous RGB uint8 array is returned without a copy."""
    rgb = np.zeros((4, 5, 3), np.uint8)
    assert to_rgb(rgb) is rgb


def test_gray_array_and_pil_agree():
    """(H, W) and (H, W, 1) grey arrays replicate like PIL's L -> RGB."""
    gray = np.random.default_rng(0).integers(0, 256, (6, 7), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(gray).convert('RGB'))
    assert np.array_equal(to_rgb(gray), expected)
    assert np.array_equal(to_rgb(gray[:, :, None]), expected)
    assert np.array_equal(to_rgb(Image.fromarray(gray)), expected)


def test_alpha_is_composited_on_white_like_transformers():
    """RGBA / LA / palette-with-transparency: as transformers' convert_to_rgb (white)."""
    image_transforms = pytest.importorskip('transformers.image_transforms')
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, (16, 256, 4), dtype=np.uint8)
    rgba[0, :, 3] = np.arange(256)  # every alpha level
    la = rgba[:, :, [0, 3]].copy()
    palette = Image.fromarray(rgba[:, :, :3]).convert('P')
    palette.info['transparency'] = 0
    for pil in (Image.fromarray(rgba), Image.fromarray(la), palette):
        ref = image_transforms.convert_to_rgb(pil, return_numpy=True)
        assert np.array_equal(to_rgb(pil), ref), pil.mode
    assert np.array_equal(to_rgb(rgba), to_rgb(Image.fromarray(rgba)))
    # Fully transparent is white, not black; opaque keeps the colour.
    clear = np.zeros((2, 2, 4), np.uint8)
    assert (to_rgb(clear) == 255).all()
    opaque = rgba.copy()
    opaque[:, :, 3] = 255
    assert np.array_equal(to_rgb(opaque), rgba[:, :, :3])


def test_sixteen_bit_and_float_scaling():
    """uint16 maps by round(v / 257); float [0, 1] by round(v * 255)."""
    values = np.array([[0, 128, 129, 257, 32896, 65535]], np.uint16)
    assert to_rgb(values)[0, :, 0].tolist() == [0, 0, 1, 1, 128, 255]
    assert np.array_equal(to_rgb(Image.fromarray(values)), to_rgb(values))  # PIL I;16
    assert np.array_equal(to_rgb(values.astype('>u2')), to_rgb(values))
    levels = (np.arange(256, dtype=np.float32) / 255)[None, :]
    assert to_rgb(levels)[0, :, 0].tolist() == list(range(256))
    assert np.array_equal(to_rgb(levels.astype(np.float64)), to_rgb(levels))
    assert to_rgb(np.full((1, 1, 3), 0.5, np.float16))[0, 0].tolist() == [128] * 3


def test_files_and_bytes(tmp_path):
    """PNG (with alpha) and JPEG from a path or bytes; EXIF orientation applied."""
    rgba = np.random.default_rng(2).integers(0, 256, (8, 12, 4), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgba).save(buf, 'PNG')
    png = tmp_path / 'a.png'
    png.write_bytes(buf.getvalue())
    expected = to_rgb(Image.fromarray(rgba))
    assert np.array_equal(to_rgb(str(png)), expected)
    assert np.array_equal(to_rgb(png), expected)
    assert np.array_equal(to_rgb(buf.getvalue()), expected)
    assert np.array_equal(to_rgb(bytearray(buf.getvalue())), expected)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    Image.fromarray(rgba[:, :, :3]).save(buf, 'JPEG', exif=exif)
    assert to_rgb(buf.getvalue()).shape == (12, 8, 3)


# to_rgb: errors.

def _png_bytes(width, height):
    buf = io.BytesIO()
    Image.new('1', (width, height)).save(buf, 'PNG')
    return buf.getvalue()


def _truncated_png():
    data = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3), np.uint8)).save(
        data, 'PNG')
    return data.getvalue()[:200]


ERROR_CASES = {
    'none': (None, 'no image'),
    'list': ([[1, 2, 3]], 'unsupported image type list'),
    'empty_array': (np.zeros((0, 5, 3), np.uint8), r'empty \(5x0'),
    'four_dims': (np.zeros((2, 2, 2, 3), np.uint8), '4 dimensions'),
    'two_channels': (np.zeros((6, 6, 2), np.uint8), 'got shape \\(6, 6, 2\\)$'),
    'five_channels': (np.zeros((6, 6, 5), np.uint8), 'got shape \\(6, 6, 5\\)$'),
    'channel_first': (np.zeros((3, 8, 8), np.uint8), 'channel-first'),
    'int_dtype': (np.zeros((4, 4, 3), np.int32), 'unsupported image dtype int32'),
    'bool_dtype': (np.zeros((4, 4), bool), 'unsupported image dtype bool'),
    'nan': (np.full((4, 4, 3), np.nan, np.float32), '48 non-finite'),
    'inf': (np.array([[0.5, np.inf]], np.float64), '1 non-finite'),
    'float_range': (np.full((2, 2, 3), 2.0, np.float32), r'\[0, 1\]; got \[2, 2\]'),
    'negative_float': (np.full((2, 2), -0.5), r'got \[-0.5, -0.5\]'),
    'side_too_long': (np.zeros((1, MAX_SIDE + 1, 3), np.uint8), 'side over 32768'),
    'too_many_pixels': (np.broadcast_to(np.zeros(1, np.uint8), (10001, 10000, 3)),
                        '100.0 megapixels.*limit is 100'),
    'empty_bytes': (b'', r'empty \(0 bytes\)'),
    'garbage_bytes': (b'certainly not an image', 'not an image Pillow can read'),
    'truncated_png': (_truncated_png(), 'corrupt or truncated'),
    'huge_png_header': (_png_bytes(MAX_SIDE + 10, 1), 'side over'),
    'bad_pil_mode': (Image.new('La', (2, 2)), "mode 'La' cannot be converted"),
}


@pytest.mark.parametrize('case', sorted(ERROR_CASES))
def test_to_rgb_errors(case):
    """Each unusable input raises ImageError with a message that says why."""
    value, message = ERROR_CASES[case]
    with pytest.raises(ImageError, match=message):
        to_rgb(value)


def test_to_rgb_file_errors(tmp_path):
    """Missing file, directory and corrupt file are named in the error."""
    with pytest.raises(ImageError, match='image file not found: .*missing.png'):
        to_rgb(tmp_path / 'missing.png')
    with pytest.raises(ImageError, match='not a file'):
        to_rgb(str(tmp_path))
    bad = tmp_path / 'bad.jpg'
    bad.write_bytes(b'\xff\xd8\xff\xe0 definitely broken')
    with pytest.raises(ImageError, match='bad.jpg'):
        to_rgb(bad)


def test_family_rejects_bad_image(tok_dir, tmp_path):
    """prepare() surfaces to_rgb's ImageError (no model weights needed)."""
    pytest.importorskip('transformers')
    from vlm_ros_tools.smolvlm_factory import make_config, preprocessor_config
    model_dir = tmp_path / 'model'
    shutil.copytree(tok_dir, model_dir)
    ids = {'bos_token_id': 1, 'eos_token_id': 2, 'pad_token_id': 2,
           'image_token_id': Tokenizer(model_dir).token_to_id('<image>'), 'vocab_size': 500}
    make_config('a', ids).save_pretrained(str(model_dir))
    (model_dir / 'preprocessor_config.json').write_text(json.dumps(preprocessor_config('a')))
    family = Idefics3Family(model_dir)
    with pytest.raises(ImageError, match='non-finite'):
        family.prepare(np.full((8, 8, 3), np.nan, np.float32), PROMPT)
