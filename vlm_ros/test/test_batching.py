"""
Continuous batching on llama.cpp: answers decoded together are the answers decoded alone.

Tiny SmolVLM, ONNX vision, a Q8_0 GGUF language model with the exact f32 KV cache. Each
request has its own image, prompt, length and settings (greedy, sampled with a seed, top-k,
repetition penalty); run alone and then together with 1, 3 or 7 others, its
tokens must not change. Cancelling one answer leaves the others as they were; a stream keeps
its last prompt for a follow-up; beam search is refused with the reason.

Why Q8_0: llama.cpp multiplies float32 and float16 weights by one row with another kernel
than by several, so batched and lone logits differ in the last bits there (about 1e-5), which
can flip a near-tied token of a random-weight model; quantized weights (the formats robots
run) take the same kernel for any row count, and the test then asserts identical tokens.
"""

import functools
import pathlib
import threading

from conftest import tiny_model
import numpy as np
import pytest
import vlm_ros
from vlm_ros.engine.datatypes import ImageOptions
from vlm_ros.engine.errors import GenerationError

pytest.importorskip('llama_cpp')
cached_test_model = functools.partial(tiny_model, 'cached_test_model')
cached_gguf = functools.partial(tiny_model, 'cached_gguf')


def _image(seed):
    rng = np.random.default_rng(seed)
    h, w = [(90, 120), (64, 64), (40, 150), (200, 60)][seed % 4]
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


# (prompt, settings): different lengths and sampling settings on purpose.
REQUESTS = [
    ('What is in the picture?', {'max_new_tokens': 400}),
    ('Describe this image.', {'max_new_tokens': 130, 'temperature': 0.9, 'seed': 7}),
    ('Where is it?', {'max_new_tokens': 36, 'top_k': 5, 'temperature': 1.0, 'seed': 3}),
    ('What colour is it?', {'max_new_tokens': 110, 'repetition_penalty': 1.3}),
    ('Is there a cup?', {'max_new_tokens': 64, 'top_k': 3}),
    ('Count the shapes.', {'max_new_tokens': 160, 'temperature': 1.0, 'top_p': 0.8, 'seed': 11}),
    ('What is left of the robot?', {'max_new_tokens': 48}),
    ('Read the sign.', {'max_new_tokens': 96, 'seed': 5, 'temperature': 1.3}),
]


@pytest.fixture(scope='module')
def pipe():
    return vlm_ros.pipeline(cached_test_model('a'), decoder_model=cached_gguf('a', 'q8_0'),
                            kv_type='f32', kv_cache_slots=0, feature_cache_mb=0,
                            max_concurrent=8, ignore_eos=True,
                            image_options=ImageOptions(do_image_splitting=False))


@pytest.fixture(scope='module')
def alone(pipe):
    """Each request's answer with nothing else running."""
    return [pipe.generate(_image(i), prompt, **settings)
            for i, (prompt, settings) in enumerate(REQUESTS)]


def _together(pipe, indices, extra=None):
    """Run the requests ``indices`` at the same time; return their results in order."""
    results, errors = {}, []
    barrier = threading.Barrier(len(indices))

    def run(i):
        prompt, settings = REQUESTS[i]
        try:
            barrier.wait()
            results[i] = pipe.generate(_image(i), prompt, **settings, **(extra or {}).get(i, {}))
        except Exception as exc:  # noqa: B902 -- reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in indices]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    return [results[i] for i in indices]


@pytest.mark.parametrize('others', [1, 3, 7])
def test_tokens_are_the_same_alone_and_batched(pipe, alone, others):
    indices = list(range(others + 1))
    before = sum(n for size, n in pipe.decoder.batch_sizes.items() if size > 1)
    for i, result in zip(indices, _together(pipe, indices), strict=True):
        assert result.token_ids == alone[i].token_ids, REQUESTS[i]
        assert result.text == alone[i].text
    # The steps really went through llama.cpp together.
    assert sum(n for size, n in pipe.decoder.batch_sizes.items() if size > 1) > before


def test_the_default_f16_cache_gives_the_same_tokens_alone_and_batched():
    pipe = vlm_ros.pipeline(cached_test_model('a'), decoder_model=cached_gguf('a', 'q8_0'),
                            kv_cache_slots=0, feature_cache_mb=0, max_concurrent=4,
                            ignore_eos=True)
    alone = [pipe.generate(_image(i), prompt, **settings).token_ids
             for i, (prompt, settings) in enumerate(REQUESTS[:4])]
    assert [r.token_ids for r in _together(pipe, [0, 1, 2, 3])] == alone


def test_the_answers_match_a_decoder_without_batching(alone):
    sequential = vlm_ros.pipeline(cached_test_model('a'), decoder_model=cached_gguf('a', 'q8_0'),
                                  kv_type='f32', kv_cache_slots=0, feature_cache_mb=0,
                                  ignore_eos=True,
                                  image_options=ImageOptions(do_image_splitting=False))
    assert sequential.max_concurrent == 1
    for i, (prompt, settings) in enumerate(REQUESTS):
        assert sequential.generate(_image(i), prompt, **settings).token_ids == \
            alone[i].token_ids


def test_cancelling_one_answer_leaves_the_others_unchanged(pipe, alone):
    stop = threading.Event()

    def on_token(n):
        if n == 5:
            stop.set()
    results = _together(pipe, [0, 3, 5], {3: {'should_stop': stop.is_set, 'on_token': on_token}})
    assert results[0].token_ids == alone[0].token_ids
    assert results[2].token_ids == alone[5].token_ids
    cancelled = results[1]
    assert cancelled.finish_reason == 'cancelled'
    assert 5 <= len(cancelled.token_ids) < len(alone[3].token_ids)
    assert cancelled.token_ids == alone[3].token_ids[:len(cancelled.token_ids)]


def test_more_callers_than_slots_wait_their_turn(alone):
    two = vlm_ros.pipeline(cached_test_model('a'), decoder_model=cached_gguf('a', 'q8_0'),
                           kv_type='f32', kv_cache_slots=0, feature_cache_mb=64,
                           max_concurrent=2, ignore_eos=True,
                           image_options=ImageOptions(do_image_splitting=False))
    indices = list(range(6))
    for i, result in zip(indices, _together(two, indices), strict=True):
        assert result.token_ids == alone[i].token_ids, REQUESTS[i]
    assert max(two.decoder.batch_sizes) == 2


def test_a_follow_up_reuses_its_prefix_and_beams_are_refused():
    pipe = vlm_ros.pipeline(cached_test_model('a'), decoder_model=cached_gguf('a', 'q8_0'),
                            kv_type='f32', kv_cache_slots=2, feature_cache_mb=0,
                            max_concurrent=2, max_new_tokens=8,
                            image_options=ImageOptions(do_image_splitting=False))
    first = pipe.generate(_image(1), 'What is in the picture?')
    again = pipe.generate(_image(1), 'What is in the picture?')
    assert first.cached_tokens == 0 and again.cached_tokens == first.prompt_tokens - 1
    with pytest.raises(GenerationError, match='max_concurrent 1'):
        pipe.generate(_image(1), 'What is in the picture?', num_beams=2)
    # The refused request left nothing behind.
    assert pipe.generate(_image(1), 'What is in the picture?').token_ids == first.token_ids


@pytest.mark.ros
def test_the_node_answers_concurrent_queries_together(node_process, ros_client):
    from test_node import image_msg, wait_active
    from vlm_ros_interfaces.srv import Query
    model_dir, gguf = cached_test_model('a'), cached_gguf('a', 'q8_0')
    node = node_process('-p', f'model_dir:={model_dir}', '-p', f'llm_model_name:={gguf}',
                        '-p', 'max_concurrent:=4', '-p', 'queue_size:=8',
                        '-p', 'kv_cache_slots:=0', '-p', 'feed_type:=1',
                        '-p', 'max_new_tokens:=200')
    assert wait_active(ros_client)
    assert node.wait_for_output('4 requests at once')
    responses = ros_client.call_together(
        Query, '/vlm_node/query',
        [Query.Request(image=image_msg(_image(i)), prompt=REQUESTS[i][0]) for i in range(4)])
    library = vlm_ros.pipeline(model_dir, decoder_model=gguf, kv_cache_slots=0,
                               max_concurrent=4, max_new_tokens=200,
                               image_options=ImageOptions(do_image_splitting=False))
    for i, response in enumerate(responses):
        assert response.success, response.error
        assert response.text == library.generate(_image(i), REQUESTS[i][0]).text


@pytest.mark.ros
def test_the_node_refuses_beams_with_concurrency(node_process, ros_client):
    node = node_process('-p', f'model_dir:={cached_test_model("a")}',
                        '-p', f'llm_model_name:={cached_gguf("a", "q8_0")}',
                        '-p', 'max_concurrent:=2', '-p', 'num_beams:=2')
    assert node.wait_for_output('num_beams > 1 needs max_concurrent 1')


def test_vlm_serve_answers_concurrent_requests_together(tmp_path):
    import base64
    import io

    from conftest import ServeProcess
    import httpx
    from PIL import Image
    model_dir, gguf = cached_test_model('a'), cached_gguf('a', 'q8_0')
    server = ServeProcess(tmp_path, model_dir, '--decoder-model', gguf, '--max-concurrent', '3',
                          '--queue-size', '6').wait_ready()
    try:
        assert '3 at once' in server.output()

        def ask(i):
            buffer = io.BytesIO()
            Image.fromarray(_image(i)).save(buffer, 'PNG')
            url = 'data:image/png;base64,' + base64.b64encode(buffer.getvalue()).decode()
            body = {'model': pathlib.Path(model_dir).name, 'max_tokens': 150, 'ignore_eos': True,
                    'messages': [{'role': 'user', 'content': [
                        {'type': 'image_url', 'image_url': {'url': url}},
                        {'type': 'text', 'text': REQUESTS[i][0]}]}]}
            answers[i] = httpx.post(server.url + '/chat/completions', json=body, timeout=120)

        answers = {}
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        library = vlm_ros.pipeline(model_dir, decoder_model=gguf, kv_cache_slots=0,
                                   max_concurrent=3)
        timings = []
        for i in range(3):
            assert answers[i].status_code == 200, answers[i].text
            body = answers[i].json()
            assert body['choices'][0]['message']['content'] == library.generate(
                _image(i), REQUESTS[i][0], max_new_tokens=150, ignore_eos=True).text
            timings.append(body['vlm_ros']['timings_ms'])
        # Each started at once: none waited in line for another's answer.
        assert max(t['queue'] for t in timings) < min(t['decode'] for t in timings)
    finally:
        assert server.stop() == 0, server.output()[-3000:]


def test_a_dropped_decoder_is_freed_and_its_decode_thread_ends():
    import gc
    import weakref
    pipe = vlm_ros.pipeline(cached_test_model('a'), decoder_model=cached_gguf('a', 'q8_0'),
                            max_concurrent=2, max_new_tokens=4)
    pipe.generate(_image(0), 'What is in the picture?')
    runner = pipe.decoder._batcher._runner
    assert runner.is_alive()
    decoder = weakref.ref(pipe.decoder)
    pipe.close()
    gc.collect()
    assert decoder() is None
    runner.join(5)
    assert not runner.is_alive()


def test_callers_asking_about_one_frame_encode_it_once():
    pipe = vlm_ros.pipeline(cached_test_model('a'), decoder_model=cached_gguf('a', 'q8_0'),
                            kv_cache_slots=0, feature_cache_mb=64, max_concurrent=3,
                            max_new_tokens=40, ignore_eos=True)
    encoded, encode = [], pipe.vision.encode

    def counting_encode(request):
        encoded.append(sum(f is None for f in request.image_features))
        return encode(request)
    pipe.vision.encode = counting_encode
    frame = _image(7)
    results, barrier = {}, threading.Barrier(3)

    def ask(i):
        barrier.wait()
        results[i] = pipe.generate(frame, REQUESTS[i][0])
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(encoded) == [0, 0, 1]  # the first encodes, the others reuse
    plain = vlm_ros.pipeline(cached_test_model('a'), decoder_model=cached_gguf('a', 'q8_0'),
                             kv_cache_slots=0, feature_cache_mb=0, max_concurrent=3,
                             max_new_tokens=40, ignore_eos=True)
    for i in range(3):
        assert results[i].token_ids == plain.generate(frame, REQUESTS[i][0]).token_ids
