"""
Reuse without changing answers: the feature cache and the prompt-prefix (KV) cache.

The same questions go to a pipeline with caches on and one with caches off (same model
files, llama.cpp with the exact f32 KV cache): the greedy tokens must be identical, the
first-step logits within 1e-4, while the follow-ups prefill only their new tokens and skip
the vision encoder. Both families, ONNX Runtime and llama.cpp decoders, splitting on and off.
"""

import functools
import time

from conftest import tiny_model
import numpy as np
from PIL import Image
import pytest
import vlm_ros
from vlm_ros.engine.caches import FeatureCache, prefix_keys
from vlm_ros.engine.datatypes import ImageOptions

TOKENS = 12
QUESTIONS = ('What is in the picture?', 'What colour is it?', 'Where is it?')


cached_test_model = functools.partial(tiny_model, 'cached_test_model')
cached_internvl_model = functools.partial(tiny_model, 'cached_internvl_model')
cached_gguf = functools.partial(tiny_model, 'cached_gguf')
cached_internvl_gguf = functools.partial(tiny_model, 'cached_internvl_gguf')


def _image(seed, size=(120, 90)):
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 40, base.shape), 0, 255)
                           .astype(np.uint8))


def _model(family, runtime):
    if family == 'smolvlm':
        model_dir = cached_test_model('a')
        if runtime == 'llama.cpp':
            return model_dir, {'decoder_model': cached_gguf('a', 'f32'), 'kv_type': 'f32'}
        return model_dir, {}
    model_dir = cached_internvl_model('a')
    if runtime == 'llama.cpp':
        return model_dir, {'decoder_model': cached_internvl_gguf('a', 'f32'), 'kv_type': 'f32'}
    return model_dir, {}


@pytest.fixture(scope='module', params=[('smolvlm', 'onnxruntime'), ('smolvlm', 'llama.cpp'),
                                        ('internvl', 'onnxruntime'), ('internvl', 'llama.cpp')],
                ids=lambda p: '-'.join(p))
def pipes(request):
    family, runtime = request.param
    if runtime == 'llama.cpp':
        pytest.importorskip('llama_cpp')
    model_dir, kwargs = _model(family, runtime)
    cached = vlm_ros.pipeline(model_dir, max_new_tokens=TOKENS, feature_cache_mb=64,
                              kv_cache_slots=2, **kwargs)
    plain = vlm_ros.pipeline(model_dir, max_new_tokens=TOKENS, feature_cache_mb=0,
                             kv_cache_slots=0, **kwargs)
    return cached, plain


def _first_image_position(pipe, images, prompt, history=()):
    request = pipe.family.prepare(images, prompt, history=history)
    return int(np.flatnonzero(request.input_ids == request.image_token_id)[0])


@pytest.mark.parametrize('split', [False, True], ids=['split_off', 'split_on'])
def test_follow_ups_reuse_and_answers_do_not_change(pipes, split):
    cached, plain = pipes
    options = ImageOptions(do_image_splitting=split)
    frame, other = _image(1), _image(2)  # same size, different content
    asked = [(frame, QUESTIONS[0]), (frame, QUESTIONS[1]), (other, QUESTIONS[1])]
    results = []
    for image, question in asked:
        ours = cached.generate(image, question, image_options=options)
        reference = plain.generate(image, question, image_options=options)
        assert ours.token_ids == reference.token_ids, question
        assert reference.cached_tokens == 0
        results.append(ours)
    first, follow_up, new_image = results
    # The follow-up: same image, features from the cache, prompt prefilled from where the
    # question starts to differ.
    assert follow_up.timings.vision_ms == 0.0
    assert follow_up.cached_tokens > _first_image_position(cached, frame, QUESTIONS[1])
    assert follow_up.cached_tokens > first.image_tokens
    # The same question about another image of the same size shares nothing past the text
    # before the image: no features, no KV of the first image.
    assert new_image.timings.vision_ms > 0.0
    assert new_image.cached_tokens <= _first_image_position(cached, other, QUESTIONS[1])
    print(f'\n[caches split={split}] prefilled again: first {first.prompt_tokens}, follow-up '
          f'{follow_up.prompt_tokens - follow_up.cached_tokens} of {follow_up.prompt_tokens}, '
          f'new image {new_image.prompt_tokens - new_image.cached_tokens}')


def test_a_conversation_prefills_only_its_new_tokens(pipes):
    cached, plain = pipes
    frame = _image(3)
    history, new_tokens, prompt_len = [], [], 0
    for turn, question in enumerate(QUESTIONS):
        images = frame if turn == 0 else None
        ours = cached.generate(images, question, history=history)
        reference = plain.generate(images, question, history=history)
        assert ours.token_ids == reference.token_ids, f'turn {turn + 1}'
        if turn:
            # The whole previous prompt was computed (the image included); the previous
            # answer too, as far as its text tokenizes back to the same ids (the tiny
            # model's byte soup often does not) -- so at least the previous prompt is reused.
            assert ours.cached_tokens >= prompt_len - 2, (turn, ours.cached_tokens, prompt_len)
        new_tokens.append(ours.prompt_tokens - ours.cached_tokens)
        prompt_len = ours.prompt_tokens
        first_turn = {'text': question, 'images': [frame]} if turn == 0 else question
        history += [first_turn, ours.text]
    print(f'\n[caches] conversation, prompt tokens prefilled per turn: {new_tokens}')
    assert new_tokens[1] < new_tokens[0] / 2 and new_tokens[2] < new_tokens[0] / 2


def test_first_logits_with_a_kept_prefix_match(pipes):
    cached, plain = pipes
    frame = _image(4)
    cached.generate(frame, QUESTIONS[0])

    def first_logits(pipe, question):
        request = pipe.family.prepare(frame, question)
        request, features = plain.vision.encode(request)
        session, logits = pipe.decoder.start(request.input_ids, features,
                                             request.image_token_id)
        return session, logits

    session, ours = first_logits(cached, QUESTIONS[1])
    assert session.cached_tokens > 0
    _, reference = first_logits(plain, QUESTIONS[1])
    assert np.abs(ours - reference).max() <= 1e-4


def test_caches_stay_within_their_bounds(pipes):
    cached, _ = pipes
    options = ImageOptions(do_image_splitting=False)
    cached.generate(_image(10), QUESTIONS[0], max_new_tokens=2, image_options=options)
    one_image = cached.feature_cache.get(
        next(iter(cached.feature_cache._items))).nbytes
    saved, cached.feature_cache = cached.feature_cache, FeatureCache(int(2.5 * one_image))
    try:
        for seed in range(11, 17):
            cached.generate(_image(seed), QUESTIONS[0], max_new_tokens=2,
                            image_options=options)
        cache = cached.feature_cache
        assert len(cache) == 2 and cache.bytes == 2 * one_image <= cache.max_bytes
    finally:
        cached.feature_cache = saved
    decoder = cached.decoder
    kept = getattr(decoder, '_kept', None)
    kept = kept if kept is not None else decoder._prefixes.seqs_in_use()
    assert len(kept) <= 2


def test_feature_cache_is_an_lru_bounded_in_bytes():
    cache = FeatureCache(3 * 4000)
    blocks = {k: np.full((10, 100), k, dtype=np.float32) for k in range(4)}  # 4000 bytes each
    for k in range(3):
        cache.put(k, blocks[k])
    assert cache.get(0) is not None  # 0 is now the most recent
    cache.put(3, blocks[3])
    assert cache.get(1) is None and cache.get(0) is not None and cache.get(3) is not None
    assert cache.bytes == 3 * 4000 and len(cache) == 3
    cache.put('huge', np.zeros((2000, 100), np.float32))  # larger than the bound: not kept
    assert cache.get('huge') is None and cache.bytes <= 3 * 4000
    off = FeatureCache(0)
    off.put(0, blocks[0])
    assert off.get(0) is None


def test_prefix_keys_tell_images_apart():
    ids = np.array([1, 2, 9, 9, 9, 3, 9, 9, 4])
    a = np.arange(5 * 4, dtype=np.float32).reshape(5, 4) / 7
    b = a.copy()
    b[4, 0] += 1e-3  # the second image's last feature differs a little
    keys_a, keys_b = prefix_keys(ids, a, 9), prefix_keys(ids, b, 9)
    assert keys_a[:5].tolist() == keys_b[:5].tolist()  # first image: identical features
    assert keys_a[6] != keys_b[6]  # second image: a different run
    assert keys_a[5] == 3 and keys_a[8] == 4 and (keys_a[[2, 3, 4, 6, 7]] < 0).all()
    assert len(set(keys_a[[2, 3, 4]].tolist())) == 3


def test_a_long_prefill_can_be_cancelled(pipes):
    """should_stop is honoured between prefill chunks, not only between new tokens."""
    _, plain = pipes
    polls = []

    def should_stop():
        polls.append(time.perf_counter())
        return len(polls) > 1  # let the first chunk run, then stop

    prompt = 'look ' * 1200  # more than one 512-position chunk
    start = time.perf_counter()
    result = plain.generate(None, prompt, should_stop=should_stop)
    assert result.finish_reason == 'cancelled' and result.token_ids == []
    assert len(polls) == 2 and result.timings.prefill_ms > 0
    assert time.perf_counter() - start < 10
