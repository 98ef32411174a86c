"""
llama.cpp as the decoder (and libmtmd as the image encoder) against transformers.

The tiny SmolVLM test models are exported to GGUF from the same PyTorch weights
(``vlm_ros_tools.gguf_export``), so logits and greedy tokens can be compared directly with
``SmolVLMForConditionalGeneration``; image features come from transformers, from our ONNX
vision encoder, or from llama.cpp's own projector (mmproj).
"""

import os

import numpy as np
from PIL import Image
import pytest

from reference import Reference
from vlm_ros.engine.datatypes import GenerationConfig
from vlm_ros.engine.errors import (GenerationError, ModelFilesError, ModelMismatchError,
                                   PromptTooLongError, UnsupportedModelError)
from vlm_ros.engine.generation import generate
from vlm_ros.engine.runtimes.llamacpp import LlamaCppDecoder

torch = pytest.importorskip('torch')
pytest.importorskip('gguf')
pytest.importorskip('llama_cpp')
os.environ.setdefault('HF_HUB_OFFLINE', '1')

from vlm_ros_tools.export_onnx import cached_test_model  # noqa: E402
from vlm_ros_tools.gguf_export import cached_gguf, cached_mmproj  # noqa: E402
from vlm_ros_tools.smolvlm_factory import load_processor  # noqa: E402

PROMPT = 'Describe this image.'
NEW_TOKENS = 32
# Exact settings: float32 weights and KV cache, no (float16) CPU flash attention.
EXACT = {'kv_type': 'f32', 'flash_attn': False}
KINDS = ('square', 'wide', 'tall', 'tiny', 'noise')


def _image(kind, seed=0):
    """Draw a deterministic test picture: gradients plus noise (or pure noise)."""
    rng = np.random.default_rng(seed)
    sizes = {'square': (160, 160), 'wide': (320, 120), 'tall': (100, 300), 'tiny': (20, 30),
             'noise': (150, 100), 'tile_a': (256, 256), 'tile_b': (384, 384)}
    w, h = sizes[kind]
    if kind == 'noise':
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 30, base.shape), 0, 255)
                           .astype(np.uint8))


class SmolVLMReference(Reference):
    """The reference plus the pieces the llama.cpp tests feed it separately."""

    def __init__(self, model_dir):
        super().__init__(model_dir, 'SmolVLMForConditionalGeneration', load_processor,
                         NEW_TOKENS)

    def features(self, inputs):
        """Return the connector output for the images of ``inputs``: float32 [tokens, hidden]."""
        with torch.no_grad():
            out = self.model.model.get_image_features(inputs['pixel_values'],
                                                      inputs['pixel_attention_mask'])
        return torch.cat(list(out.pooler_output)).numpy()

    def embed_rows(self, ids):
        return self.model.get_input_embeddings().weight.detach()[ids].numpy()


@pytest.fixture(scope='module', params=['a', 'b'])
def model(request):
    """(variant, reference, exact f32 decoder) per tiny config."""
    variant = request.param
    ref = SmolVLMReference(cached_test_model(variant))
    decoder = LlamaCppDecoder(cached_gguf(variant, 'f32'), max_beams=3, **EXACT)
    yield variant, ref, decoder
    decoder.close()


def _ids_features(ref, image, prompt=PROMPT):
    inputs = ref.inputs(image, prompt)
    ids = inputs['input_ids'][0].numpy()
    features = ref.features(inputs) if image is not None else None
    return inputs, ids, features


def _greedy(decoder, ids, features, image_token_id, eos, n=NEW_TOKENS, **config):
    session, logits = decoder.start(ids, features, image_token_id)
    out = generate(session, logits, ids.tolist(), GenerationConfig(**config).validate(), eos,
                   decoder.detokenize, n)
    return out.token_ids


# -- (a) logits against PyTorch -------------------------------------------------------------

@pytest.mark.parametrize('arch', ['llama', 'qwen2'])
def test_first_logits_match_pytorch(model, arch):
    variant, ref, decoder = model
    if arch != 'llama':
        decoder = LlamaCppDecoder(cached_gguf(variant, 'f32', arch), **EXACT)
    for image in (_image('wide'), None):
        inputs, ids, features = _ids_features(ref, image)
        _, logits = decoder.start(ids, features, ref.config.image_token_id)
        assert logits.shape == (1, ref.config.text_config.vocab_size)
        assert logits.dtype == np.float32
        diff = np.abs(logits[0] - ref.first_logits(inputs)).max()
        assert diff <= 1e-3, f'{variant}/{arch}: max logit difference {diff}'


def test_default_settings_are_close(model, capsys):
    """llama.cpp's defaults (float16 KV cache, flash attention) stay near the reference."""
    variant, ref, _ = model
    decoder = LlamaCppDecoder(cached_gguf(variant, 'f32'))
    inputs, ids, features = _ids_features(ref, _image('square'))
    _, logits = decoder.start(ids, features, ref.config.image_token_id)
    expected = ref.first_logits(inputs)
    diff = np.abs(logits[0] - expected).max()
    with capsys.disabled():
        print(f'\n[llama.cpp {variant}] f16 KV + flash attention: max logit diff {diff:.2e} '
              f'(logits up to {np.abs(expected).max():.1f})')
    assert diff <= 0.1
    # The same top token only where the reference's own margin exceeds what f16 can move.
    top2 = np.sort(expected)[-2:]
    if top2[1] - top2[0] > 2 * 0.1:
        assert int(logits[0].argmax()) == int(expected.argmax())


# -- (b) embedding batches against token batches ------------------------------------------

def test_embedding_path_equals_token_path(model):
    _, ref, decoder = model
    ids = np.array(ref.processor.tokenizer(ref.text(0, 'Describe the robot on the table.'),
                                           add_special_tokens=False)['input_ids'])
    placeholder = ref.config.image_token_id
    for slots in ([3, 4, 5, 6], [0, 1], list(range(len(ids) - 4, len(ids))), [2, 7, 8]):
        mixed = ids.copy()
        mixed[slots] = placeholder
        rows = ref.embed_rows(ids[slots])
        session_t, logits_t = decoder.start(ids)
        steps_t = [session_t.step([t]) for t in (5, 9, 11)]
        session_e, logits_e = decoder.start(mixed, rows, placeholder)
        steps_e = [session_e.step([t]) for t in (5, 9, 11)]
        assert np.abs(logits_t - logits_e).max() <= 1e-4, f'slots {slots}'
        for a, b in zip(steps_t, steps_e, strict=True):
            assert np.abs(a - b).max() <= 1e-4, f'slots {slots}'


@pytest.mark.parametrize('ftype', ['f32', 'f16', 'q8_0', 'q4_0'])
def test_whole_prompt_as_embeddings_equals_runs(model, ftype):
    """One embeddings input with text rows read from the GGUF equals token/image runs."""
    variant, ref, _ = model
    path = cached_gguf(variant, ftype)
    whole = LlamaCppDecoder(path, **EXACT)
    runs = LlamaCppDecoder(path, prompt_as_embeddings=False, **EXACT)
    assert whole._token_rows is not None and runs._token_rows is None
    inputs, ids, features = _ids_features(ref, _image('tile_b'))
    placeholder = ref.config.image_token_id
    assert np.count_nonzero(np.diff((ids == placeholder).astype(int))) >= 4  # several runs
    _, a = whole.start(ids, features, placeholder)
    _, b = runs.start(ids, features, placeholder)
    assert np.abs(a - b).max() <= 1e-4 * max(1.0, np.abs(b).max()), ftype
    assert (_greedy(whole, ids, features, placeholder, ref.eos)
            == _greedy(runs, ids, features, placeholder, ref.eos))


def test_token_rows_equal_gguf_readers_tensor(model):
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from vlm_ros.engine.gguf_file import TensorRows

    variant, _, _ = model
    for ftype in ('f32', 'f16', 'q8_0', 'q4_0'):
        path = cached_gguf(variant, ftype)
        tensor = next(t for t in GGUFReader(path).tensors if t.name == 'token_embd.weight')
        table = dequantize(tensor.data, tensor.tensor_type)
        rows = TensorRows.from_file(path, 'token_embd.weight')
        picks = [0, 7, len(table) - 1, 7]
        assert rows.qtype == tensor.tensor_type
        np.testing.assert_array_equal(rows(picks), table[picks])
    assert TensorRows.from_file(path, 'no_such.weight') is None


def test_long_prompts_are_chunked(model):
    """Prompts longer than one llama.cpp batch give the same logits as transformers."""
    variant, ref, _ = model
    decoder = LlamaCppDecoder(cached_gguf(variant, 'f32'), n_batch=16, **EXACT)
    inputs, ids, features = _ids_features(ref, _image('wide', seed=2))
    assert len(ids) > 3 * decoder.n_batch
    _, logits = decoder.start(ids, features, ref.config.image_token_id)
    assert np.abs(logits[0] - ref.first_logits(inputs)).max() <= 1e-3


# -- (c) greedy answers ---------------------------------------------------------------------

@pytest.mark.parametrize('kind', KINDS)
def test_greedy_tokens_match_transformers(model, kind):
    variant, ref, decoder = model
    inputs, ids, features = _ids_features(ref, _image(kind, seed=1))
    expected = ref.generate(inputs)
    ours = _greedy(decoder, ids, features, ref.config.image_token_id, ref.eos)
    assert ours == expected, f'variant {variant}, {kind}: diverged'


def test_text_only_greedy_matches_transformers(model):
    _, ref, decoder = model
    inputs, ids, _ = _ids_features(ref, None, 'Hello there.')
    assert _greedy(decoder, ids, None, None, ref.eos) == ref.generate(inputs)


@pytest.mark.parametrize('beams', [2, 3])
def test_beam_search_matches_transformers(model, beams):
    _, ref, decoder = model
    inputs, ids, features = _ids_features(ref, _image('square', seed=3))
    expected = ref.generate(inputs, num_beams=beams)
    ours = _greedy(decoder, ids, features, ref.config.image_token_id, ref.eos,
                   num_beams=beams)
    assert ours == expected


def test_beam_search_needs_max_beams(model):
    variant, ref, _ = model
    decoder = LlamaCppDecoder(cached_gguf(variant, 'f32'))
    _, ids, features = _ids_features(ref, _image('square'))
    with pytest.raises(GenerationError, match='beam search'):
        _greedy(decoder, ids, features, ref.config.image_token_id, ref.eos, num_beams=2)


def test_pipeline_with_onnx_vision_and_llamacpp_decoder(model):
    """The whole pipeline (our preprocessing and ONNX vision encoder) on llama.cpp."""
    import vlm_ros
    from vlm_ros.engine.pipeline import Pipeline

    variant, ref, _ = model
    onnx = vlm_ros.pipeline(cached_test_model(variant))
    decoder = LlamaCppDecoder(cached_gguf(variant, 'f32'), max_beams=2,
                              expected_hidden_size=onnx.family.text_hidden_size, **EXACT)
    pipe = Pipeline(onnx.family, onnx.vision, decoder,
                    GenerationConfig(max_new_tokens=NEW_TOKENS))
    for kind in ('wide', 'tall'):
        image = _image(kind, seed=4)
        expected = ref.generate(ref.inputs(image, PROMPT))
        assert pipe.generate(image, PROMPT).token_ids == expected
        assert pipe.generate(image, PROMPT).token_ids == onnx.generate(
            image, PROMPT, max_new_tokens=NEW_TOKENS).token_ids
    image = _image('square', seed=3)
    assert pipe.generate(image, PROMPT, num_beams=2).token_ids == ref.generate(
        ref.inputs(image, PROMPT), num_beams=2)
    # Two images in one question, and a 2-turn conversation.
    images = [_image('wide', seed=1), _image('tiny', seed=2)]
    history = ('What is it?', 'A robot arm on a table.')
    for imgs, hist in ((images, ()), (images[:1], history)):
        expected = ref.generate(ref.inputs(imgs, PROMPT, history=hist))
        assert pipe.generate(imgs, PROMPT, history=hist).token_ids == expected


# -- (d) quantised files --------------------------------------------------------------------

def test_q8_0_mostly_agrees_and_q4_0_runs(model, capsys):
    variant, ref, decoder = model
    q8 = LlamaCppDecoder(cached_gguf(variant, 'q8_0'))
    q4 = LlamaCppDecoder(cached_gguf(variant, 'q4_0'))
    f16 = LlamaCppDecoder(cached_gguf(variant, 'f16'))
    cases = [(kind, seed, prompt) for kind in KINDS for seed in (0, 1)
             for prompt in (PROMPT, 'What is in the picture?')]
    agree = {'q8_0': 0, 'f16': 0}
    for kind, seed, prompt in cases:
        _, ids, features = _ids_features(ref, _image(kind, seed), prompt)
        exact = int(decoder.start(ids, features, ref.config.image_token_id)[1].argmax())
        for name, other in (('q8_0', q8), ('f16', f16)):
            agree[name] += int(other.start(ids, features,
                                           ref.config.image_token_id)[1].argmax()) == exact
    _, ids, features = _ids_features(ref, _image('square'))
    tokens = _greedy(q4, ids, features, ref.config.image_token_id, ref.eos, n=8)
    assert tokens and all(0 <= t < q4.vocab_size for t in tokens)
    with capsys.disabled():
        print(f'\n[llama.cpp {variant}] first greedy token equals f32 on '
              f'{agree["q8_0"]}/{len(cases)} (Q8_0), {agree["f16"]}/{len(cases)} (F16) '
              f'prompts; Q4_0 answered {len(tokens)} tokens')
    assert agree['q8_0'] >= 0.75 * len(cases)
    assert agree['f16'] >= 0.9 * len(cases)


# -- tokenizer ------------------------------------------------------------------------------

def test_gguf_tokenizer_matches_transformers(model):
    _, ref, decoder = model
    texts = ['Describe this image.', 'The robot is 12 cm tall, 345.6 g!', '  two  spaces\n\n',
             "It's the dog's bowl; they'll see.", 'Zürich café — naïve', '\t tab\r\n',
             ref.text(1, PROMPT), ref.text(0, 'What colour is the car?') + ' The car is blue.',
             '<row_1_col_2><image><fake_token_around_image>x<end_of_utterance>']
    tokenizer = ref.processor.tokenizer
    for text in texts:
        expected = tokenizer(text, add_special_tokens=False)['input_ids']
        assert decoder.tokenize(text) == expected, repr(text)
        assert decoder.detokenize(expected) == tokenizer.decode(expected), repr(text)
    eog = set(decoder.eog_token_ids())
    assert set(ref.eos) <= eog
    assert decoder.metadata('tokenizer.chat_template') == ref.processor.chat_template
    assert decoder.metadata('tokenizer.ggml.pre') == 'smollm'
    assert decoder.metadata('no.such.key') is None


def test_export_from_a_loaded_model_equals_export_from_its_folder(model, tmp_path):
    from vlm_ros_tools.gguf_export import export_text_gguf
    variant, ref, _ = model
    path = export_text_gguf(ref.model, tmp_path / 'from_model.gguf')
    assert path.read_bytes() == open(cached_gguf(variant, 'f32'), 'rb').read()


# -- (e) errors -----------------------------------------------------------------------------

def test_not_a_language_model(tmp_path):
    with pytest.raises(UnsupportedModelError, match='mmproj'):
        LlamaCppDecoder(cached_mmproj('a'))
    garbage = tmp_path / 'garbage.gguf'
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(ModelFilesError, match='not a GGUF file'):
        LlamaCppDecoder(garbage)
    with pytest.raises(ModelFilesError, match='not found'):
        LlamaCppDecoder(tmp_path / 'missing.gguf')
    data = open(cached_gguf('a', 'f32'), 'rb').read()
    truncated = tmp_path / 'truncated.gguf'
    truncated.write_bytes(data[:len(data) // 2])
    with pytest.raises(ModelFilesError, match='truncated.gguf'):
        LlamaCppDecoder(truncated)


def test_clip_and_unknown_architectures(tmp_path):
    import gguf
    for arch, error in (('clip', 'multimodal projector'), ('bert', 'not a text decoder'),
                        ('nosuchmodel', 'unknown model architecture')):
        path = tmp_path / f'{arch}.gguf'
        writer = gguf.GGUFWriter(str(path), arch)
        writer.add_block_count(1)
        writer.add_tensor('dummy.weight', np.zeros(32, np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with pytest.raises(UnsupportedModelError, match=error):
            LlamaCppDecoder(path)


def test_feature_width_and_count_mismatch(model):
    variant, ref, decoder = model
    width = decoder.hidden_size
    with pytest.raises(ModelMismatchError, match='width'):
        LlamaCppDecoder(cached_gguf(variant, 'f32'), expected_hidden_size=width + 1)
    image_token = ref.config.image_token_id
    ids = np.array([1, image_token, image_token, 2])
    with pytest.raises(ModelMismatchError, match='width'):
        decoder.start(ids, np.zeros((2, width * 2), np.float32), image_token)
    with pytest.raises(ModelMismatchError, match='2 image tokens'):
        decoder.start(ids, np.zeros((3, width), np.float32), image_token)
    with pytest.raises(ModelMismatchError, match='outside the vocabulary'):
        decoder.start(np.array([1, decoder.vocab_size + 5]))


def test_context_overflow(model):
    variant, ref, _ = model
    decoder = LlamaCppDecoder(cached_gguf(variant, 'f32'), n_ctx=64)
    assert decoder.context_length == 64
    with pytest.raises(PromptTooLongError, match='64-token context'):
        decoder.start(np.ones(64, np.int64))
    _, ids, features = _ids_features(ref, _image('square'))
    with pytest.raises(PromptTooLongError):
        decoder.start(ids, features, ref.config.image_token_id)
    session, logits = decoder.start(np.ones(60, np.int64))
    with pytest.raises(PromptTooLongError, match='answer reached'):
        for _ in range(8):
            logits = session.step(np.array([int(logits.argmax())]))
    assert session.length == 64
    newer, _ = decoder.start(np.ones(3, np.int64))
    with pytest.raises(GenerationError, match='superseded'):
        session.step(np.array([1]))
    assert newer.step(np.array([1])).shape == (1, decoder.vocab_size)


# -- libmtmd: llama.cpp's own projector -----------------------------------------------------

@pytest.fixture(scope='module')
def mtmd_encoder(model):
    from vlm_ros.engine.runtimes.mtmd import MtmdImageEncoder
    variant, ref, decoder = model
    encoder = MtmdImageEncoder(cached_mmproj(variant), decoder, flash_attn=False)
    yield encoder
    encoder.close()


def test_mtmd_matches_transformers(model, mtmd_encoder, capsys):
    """Check that libmtmd lays the prompt out as transformers does, with close features."""
    variant, ref, decoder = model
    image = _image(f'tile_{variant}', seed=6)  # an exact 4x4 grid: tiles need no resizing
    inputs, ids, features = _ids_features(ref, image)
    request = mtmd_encoder.prepare(ref.text(1, PROMPT), [np.asarray(image)],
                                   image_placeholder='<image>')
    assert request.image_token_id == ref.config.image_token_id
    assert request.input_ids.tolist() == ids.tolist()
    assert request.features.shape == features.shape
    diff = np.abs(request.features - features).max()
    session, logits = decoder.start(request.input_ids, request.features,
                                    request.image_token_id)
    logit_diff = np.abs(logits[0] - ref.first_logits(inputs)).max()
    with capsys.disabled():
        print(f'\n[mtmd {variant}] feature diff {diff:.2e} (features up to '
              f'{np.abs(features).max():.1f}), first logit diff {logit_diff:.2e}')
    assert diff <= 0.05 and logit_diff <= 0.05
    tokens = generate(session, logits, request.input_ids.tolist(),
                      GenerationConfig().validate(), ref.eos, decoder.detokenize, 8).token_ids
    assert tokens and tokens[0] == int(ref.first_logits(inputs).argmax())


def test_mtmd_any_image_size(model, mtmd_encoder):
    _, ref, _ = model
    for kind in ('wide', 'tiny', 'tall'):
        image = _image(kind)
        _, ids, _ = _ids_features(ref, image)
        request = mtmd_encoder.prepare(ref.text(1, PROMPT), [np.asarray(image)],
                                       image_placeholder='<image>')
        assert request.input_ids.tolist() == ids.tolist(), kind
        assert request.num_image_tokens == int((ids == ref.config.image_token_id).sum())


def test_mtmd_several_images_and_history(model, mtmd_encoder):
    """Check that libmtmd lays out two images and earlier turns as the processor does."""
    _, ref, _ = model
    images = [_image('wide'), _image('tall', seed=2)]
    history = ('What is it?', 'A robot arm on a table.')
    inputs = ref.inputs(images, PROMPT, history=history)
    request = mtmd_encoder.prepare(ref.text(2, PROMPT, history=history),
                                   [np.asarray(i) for i in images], image_placeholder='<image>')
    assert request.input_ids.tolist() == inputs['input_ids'][0].tolist()


def test_mtmd_errors(model, mtmd_encoder):
    from vlm_ros.engine.errors import ImageError
    from vlm_ros.engine.runtimes.mtmd import MtmdImageEncoder
    variant, ref, decoder = model
    with pytest.raises(ImageError, match='markers'):
        mtmd_encoder.prepare(ref.text(1, PROMPT), [], image_placeholder='<image>')
    with pytest.raises(ImageError, match='RGB'):
        mtmd_encoder.prepare(ref.text(1, PROMPT), [np.zeros((8, 8), np.uint8)],
                             image_placeholder='<image>')
    with pytest.raises(ModelFilesError, match='not a multimodal projector'):
        MtmdImageEncoder(cached_gguf(variant, 'f32'), decoder)
    other = 'b' if variant == 'a' else 'a'
    with pytest.raises(ModelMismatchError, match='n_embd'):
        MtmdImageEncoder(cached_mmproj(other), decoder)


def test_a_short_prompt_after_beams_leaves_no_stale_sequence_ids():
    """
    The token batch is reused: every entry's sequence id must be rewritten when it changes.

    A beam step fills entries 0..2 with beam sequences; a 1-token prompt then used entry 0
    only; a longer prompt after it once went partly into the beams' sequences.
    """
    path = cached_gguf('a', 'q8_0')
    decoder = LlamaCppDecoder(path, max_beams=3, **EXACT)
    session, logits = decoder.start([5, 6, 7, 8])
    session.select(np.array([0, 0, 0]))
    session.step(np.array([9, 10, 11]))
    decoder.start([12])
    prompt = list(range(20, 60))
    _, after = decoder.start(prompt)
    _, fresh = LlamaCppDecoder(path, max_beams=3, **EXACT).start(prompt)
    np.testing.assert_array_equal(after, fresh)
