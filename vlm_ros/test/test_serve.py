"""
The OpenAI-compatible server vlm_serve, as its clients see it.

The real executable runs on a loopback port and is called with the official ``openai``
client, plain httpx and the project's own ``RemoteClient``.

The reference for every answer is the local pipeline on the same tiny model, greedy: the
images travel as PNG data URLs, so the server decodes exactly the pixels the pipeline gets.
One server serves the whole module, with a queue of one (so one slow request makes the next
one wait for a 429), an API key, a 1 MiB body limit and an image folder for file:// URLs.
"""

import asyncio
import base64
import io
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

from conftest import installed_executable, ServeProcess
import httpx
import numpy as np
from PIL import Image
import pytest
import vlm_ros
from vlm_ros.engine.datatypes import ImageOptions
from vlm_ros.engine.remote import RemoteClient
from vlm_ros.serve import chat_request, image_sources
from vlm_ros.serve.api_errors import ApiError

openai = pytest.importorskip('openai')
pytest.importorskip('torch')
from vlm_ros_tools.export_onnx import cached_test_model  # noqa: E402

KEY_ENV = 'VLM_TEST_SERVE_KEY'
KEY = 'serve-key-5d1c'
MODEL = 'tiny-smolvlm'
PROMPT = 'What is in the picture?'
TOKENS = 12
# The tiny model decodes about 300 tokens/s here; this runs for many seconds unless stopped.
LONG = {'max_tokens': 6000, 'extra_body': {'ignore_eos': True}}


def frame(seed=0, width=96, height=72):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def png_bytes(rgb):
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, 'PNG')
    return buffer.getvalue()


def data_url(rgb):
    return 'data:image/png;base64,' + base64.b64encode(png_bytes(rgb)).decode()


def user(text, *urls):
    parts = [{'type': 'image_url', 'image_url': {'url': u}} for u in urls]
    return {'role': 'user', 'content': parts + [{'type': 'text', 'text': text}]}


@pytest.fixture(scope='module')
def model_dir():
    return pathlib.Path(cached_test_model('a'))


@pytest.fixture(scope='module')
def pipe(model_dir):
    return vlm_ros.pipeline(str(model_dir))


@pytest.fixture(scope='module')
def image_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp('images')
    (folder / 'frame.png').write_bytes(png_bytes(frame(3)))
    outside = tmp_path_factory.mktemp('private') / 'secret.png'
    outside.write_bytes(png_bytes(frame(4)))
    (folder / 'escape.png').symlink_to(outside)
    return folder


@pytest.fixture(scope='module')
def server(model_dir, image_dir, tmp_path_factory):
    srv = ServeProcess(tmp_path_factory.mktemp('serve'), model_dir, '--threads', '1',
                       '--served-model-name', MODEL, '--api-key-env', KEY_ENV,
                       '--queue-size', '1', '--max-body-mb', '1', '--image-dir', image_dir,
                       env={KEY_ENV: KEY})
    srv.wait_ready()
    yield srv
    assert srv.stop() == 0, srv.output()[-3000:]
    assert KEY not in srv.output()


@pytest.fixture(scope='module')
def client(server):
    # No retries: the client must see every 429 and 5xx as it is.
    return openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=60)


def metric(server, name, **labels):
    """Read one sample from GET /metrics (0 when absent)."""
    text = httpx.get(server.base + '/metrics').text
    label = ','.join(f'{k}="{v}"' for k, v in labels.items())
    pattern = '^' + re.escape(name + (f'{{{label}}}' if label else '')) + r' (\S+)$'
    found = re.search(pattern, text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def wait_idle(server, timeout=10.0):
    """Return how long until the server's queue is empty; fail past ``timeout``."""
    start = time.monotonic()
    while httpx.get(server.base + '/health').json()['queue_depth'] > 0:
        assert time.monotonic() - start < timeout, 'the queue did not drain'
        time.sleep(0.02)
    return time.monotonic() - start


# Answers --------------------------------------------------------------------------------

def test_answers_equal_the_local_pipeline(server, client, pipe):
    successes = metric(server, 'vlm_serve_requests_total', outcome='success')
    tokens = metric(server, 'vlm_serve_completion_tokens_total')
    ttft = metric(server, 'vlm_serve_time_to_first_token_seconds_count')
    rgb = frame(0)
    expected = pipe.generate(rgb, PROMPT, max_new_tokens=TOKENS)
    reply = client.chat.completions.create(model=MODEL, messages=[user(PROMPT, data_url(rgb))],
                                           max_tokens=TOKENS, temperature=0)
    choice = reply.choices[0]
    assert choice.message.content == expected.text and choice.message.role == 'assistant'
    assert choice.finish_reason == expected.finish_reason == 'length'
    assert reply.usage.completion_tokens == expected.completion_tokens == TOKENS
    assert reply.usage.prompt_tokens == expected.prompt_tokens
    assert reply.model == MODEL and reply.id.startswith('chatcmpl-')
    assert reply.vlm_ros['image_tokens'] == expected.image_tokens > 0
    assert reply.vlm_ros['timings_ms']['vision'] > 0

    # Streamed: the text comes in several chunks, the first one already carrying text.
    stream = client.chat.completions.create(
        model=MODEL, messages=[user(PROMPT, data_url(rgb))], max_tokens=TOKENS,
        stream=True, stream_options={'include_usage': True})
    chunks = list(stream)
    texts = [c.choices[0].delta.content for c in chunks if c.choices]
    assert ''.join(t or '' for t in texts) == expected.text
    assert len([t for t in texts if t]) > 1
    first = chunks[0].choices[0].delta
    assert first.role == 'assistant' and first.content, 'an empty chunk was sent first'
    assert chunks[-2].choices[0].finish_reason == 'length'
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == TOKENS
    assert chunks[-1].usage.prompt_tokens == expected.prompt_tokens

    # Sampling with a seed, and stop strings, as the pipeline does them.
    sampled = pipe.generate(rgb, PROMPT, max_new_tokens=TOKENS, temperature=0.8, top_k=20,
                            top_p=0.9, seed=7, repetition_penalty=1.1)
    reply = client.chat.completions.create(
        model=MODEL, messages=[user(PROMPT, data_url(rgb))], max_completion_tokens=TOKENS,
        temperature=0.8, top_p=0.9, seed=7,
        extra_body={'top_k': 20, 'repetition_penalty': 1.1})
    assert reply.choices[0].message.content == sampled.text
    stop = expected.text[len(expected.text) // 2:][:3]
    cut = pipe.generate(rgb, PROMPT, max_new_tokens=TOKENS, stop=(stop, 'zzz'))
    reply = client.chat.completions.create(model=MODEL, messages=[user(PROMPT, data_url(rgb))],
                                           max_tokens=TOKENS, stop=[stop, 'zzz'])
    assert reply.choices[0].message.content == cut.text
    assert reply.choices[0].finish_reason == 'stop' and len(cut.text) < len(expected.text)

    assert metric(server, 'vlm_serve_requests_total', outcome='success') == successes + 4
    assert metric(server, 'vlm_serve_completion_tokens_total') > tokens + 3 * TOKENS - 1
    assert metric(server, 'vlm_serve_time_to_first_token_seconds_count') >= ttft + 3
    assert metric(server, 'vlm_serve_queue_depth') == 0
    assert metric(server, 'vlm_serve_queue_capacity') == 1


def test_conversation_system_prompt_and_several_images(client, pipe):
    first, second = frame(1), frame(2, 64, 80)
    messages = [{'role': 'system', 'content': 'Answer briefly.'},
                {'role': 'user', 'content': 'Hello there.'},
                {'role': 'assistant', 'content': [{'type': 'text', 'text': 'Hi. Ask away.'}]},
                user('What differs between these?', data_url(first), data_url(second))]
    expected = pipe.generate([first, second], 'What differs between these?', 'Answer briefly.',
                             history=['Hello there.', 'Hi. Ask away.'], max_new_tokens=TOKENS)
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=TOKENS)
    assert reply.choices[0].message.content == expected.text
    assert reply.usage.prompt_tokens == expected.prompt_tokens
    assert reply.vlm_ros['image_tokens'] == expected.image_tokens
    # Two user messages in a row are one turn; a text-only question needs no image.
    text_only = pipe.generate(None, 'Hello there.\nAnd again?', max_new_tokens=TOKENS)
    reply = client.chat.completions.create(
        model=MODEL, max_tokens=TOKENS, messages=[{'role': 'user', 'content': 'Hello there.'},
                                                  {'role': 'user', 'content': 'And again?'}])
    assert reply.choices[0].message.content == text_only.text


def test_the_projects_remote_client_talks_to_vlm_serve(server, pipe, monkeypatch):
    """The node's remote backend (RemoteClient) pointed at vlm_serve: the project over HTTP."""
    monkeypatch.setenv(KEY_ENV, KEY)
    # PNG, so the pixels arrive unchanged (the default JPEG would change the answer).
    remote = RemoteClient(server.url, MODEL, api_key_env=KEY_ENV, image_format='png')
    rgb = frame(5)
    for settings in ({'max_new_tokens': TOKENS},
                     {'max_new_tokens': TOKENS, 'temperature': 0.7, 'seed': 3, 'top_k': 10},
                     {'max_new_tokens': 40, 'repetition_penalty': 1.3}):
        expected = pipe.generate(rgb, PROMPT, 'Be precise.', history=['Hi.', 'Hello.'],
                                 **settings)
        deltas = []
        result = remote.generate(rgb, PROMPT, 'Be precise.', history=['Hi.', 'Hello.'],
                                 on_text=deltas.append, **settings)
        assert result.text == expected.text and ''.join(deltas) == expected.text
        assert result.finish_reason == expected.finish_reason
        assert result.completion_tokens == expected.completion_tokens
        assert result.prompt_tokens == expected.prompt_tokens
    remote.close()


def test_file_urls_inside_the_image_dir(client, pipe, image_dir):
    expected = pipe.generate(frame(3), PROMPT, max_new_tokens=TOKENS)
    for url in (f'file://{image_dir}/frame.png', 'file:frame.png',
                f'file://{image_dir}/sub/../frame.png'):
        reply = client.chat.completions.create(model=MODEL, messages=[user(PROMPT, url)],
                                               max_tokens=TOKENS)
        assert reply.choices[0].message.content == expected.text, url
    for url, why in ((f'file://{image_dir}/../private/secret.png', 'outside the image dir'),
                     ('file:///etc/passwd', 'outside the image dir'),
                     (f'file://{image_dir}/escape.png', 'outside the image dir'),
                     (f'file://{image_dir}/missing.png', 'no file missing.png')):
        with pytest.raises(openai.BadRequestError, match=why) as err:
            client.chat.completions.create(model=MODEL, messages=[user(PROMPT, url)])
        assert 'root:' not in str(err.value)


# Errors ---------------------------------------------------------------------------------

def error_of(exc_info):
    body = exc_info.value.response.json()
    assert set(body['error']) == {'message', 'type', 'param', 'code'}
    return body['error']


def test_errors_are_precise(server, client):
    bad = metric(server, 'vlm_serve_requests_total', outcome='bad_request')
    url = data_url(frame(0))
    cases = (
        ({'messages': [user(PROMPT, 'data:image/png;base64,@@@')]}, 'not valid base64',
         'messages', 'invalid_image_url'),
        ({'messages': [user(PROMPT, 'data:image/png;base64,' +
                            base64.b64encode(b'not an image').decode())]},
         'invalid image: .*not an image Pillow can read', 'messages', 'invalid_image'),
        ({'messages': [user('hello ' * 9000, url)]}, 'fills the 8192-token context', 'messages',
         'context_length_exceeded'),
        ({'messages': [user(PROMPT, url)], 'temperature': -1}, r'temperature must be in \[0, 100',
         'temperature', 'invalid_value'),
        ({'messages': [user(PROMPT, url)], 'top_p': 0}, r'top_p must be in \(0, 1\]', 'top_p',
         'invalid_value'),
        ({'messages': [user(PROMPT, url)], 'max_tokens': 'many'}, 'max_tokens must be an integer',
         'max_tokens', None),
        ({'messages': [user(PROMPT, url)], 'n': 2}, 'n=2 is not supported', 'n',
         'unsupported_parameter'),
        ({'messages': [user('a', url), {'role': 'assistant', 'content': 'b'}, user('c')]},
         r'messages\[0\]\.content\[0\] is an image in an earlier turn: .* only in the last '
         'user message', 'messages', 'image_in_earlier_turn'),
        ({'messages': [{'role': 'assistant', 'content': 'hi'}, user('c')]},
         'must start with a user message', 'messages', None),
        ({'messages': [user(PROMPT, 'http://127.0.0.1:9/cat.png')]},
         'image URLs over http are disabled', 'messages', 'image_url_not_allowed'),
        ({'messages': [user(PROMPT, 'https://example.org/cat.png')]},
         '--allow-image-urls', 'messages', 'image_url_not_allowed'),
        ({'messages': [user(PROMPT, 'ftp://example.org/cat.png')]},
         'unsupported image URL scheme .ftp.', 'messages', 'invalid_image_url'),
    )
    for fields, message, param, code in cases:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=MODEL, **fields)
        error = error_of(err)
        assert err.value.status_code == 400
        assert re.search(message, error['message']), (message, error)
        assert (error['param'], error['code'], error['type']) == \
            (param, code, 'invalid_request_error')
    assert metric(server, 'vlm_serve_requests_total', outcome='bad_request') == \
        bad + len(cases)

    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model='gpt-4o', messages=[user(PROMPT)])
    error = error_of(err)
    assert error['code'] == 'model_not_found' and repr(MODEL) in error['message']
    for key in ('wrong-key', None):
        headers = {'Authorization': f'Bearer {key}'} if key else {}
        raw = httpx.post(server.url + '/chat/completions', headers=headers,
                         json={'model': MODEL, 'messages': [user(PROMPT)]})
        assert raw.status_code == 401 and raw.headers['www-authenticate'] == 'Bearer'
        assert raw.json()['error']['code'] == ('invalid_api_key' if key else 'missing_api_key')
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url, api_key='wrong', max_retries=0).models.list()
    auth = {'Authorization': f'Bearer {KEY}'}
    raw = httpx.post(server.url + '/chat/completions', headers=auth, content=b'{"model": ')
    assert raw.status_code == 400 and 'not valid JSON' in raw.json()['error']['message']
    big = {'model': MODEL, 'messages': [user('x' * (1 << 20))]}
    raw = httpx.post(server.url + '/chat/completions', headers=auth, json=big)
    assert raw.status_code == 413 and raw.json()['error']['code'] == 'request_too_large'
    raw = httpx.get(server.base + '/v2/nothing')
    assert raw.status_code == 404 and 'no route GET /v2/nothing' in \
        raw.json()['error']['message']
    assert metric(server, 'vlm_serve_requests_total', outcome='unauthorized') >= 2
    assert metric(server, 'vlm_serve_requests_total', outcome='too_large') >= 1
    # The server keeps serving.
    assert client.chat.completions.create(model=MODEL, messages=[user(PROMPT, url)],
                                          max_tokens=2).choices[0].finish_reason == 'length'


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve('other')
    health = httpx.get(server.base + '/health').json()
    assert health == {'status': 'ok', 'model': MODEL, 'queue_depth': 0, 'queue_capacity': 1}


# Load and disconnects -------------------------------------------------------------------

def test_overload_gets_429_and_disconnects_free_the_queue(server, client):
    busy = metric(server, 'vlm_serve_requests_total', outcome='busy')
    cancelled = metric(server, 'vlm_serve_requests_total', outcome='cancelled')
    url = data_url(frame(0))
    stream = client.chat.completions.create(model=MODEL, messages=[user(PROMPT, url)],
                                            stream=True, **LONG)
    chunks = iter(stream)
    assert next(chunks).choices[0].delta.content  # the long answer is under way
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(model=MODEL, messages=[user(PROMPT, url)])
    assert err.value.status_code == 429
    assert int(err.value.response.headers['retry-after']) >= 1
    assert error_of(err)['code'] == 'queue_full' and 'queue-size' in error_of(err)['message']
    assert metric(server, 'vlm_serve_requests_total', outcome='busy') == busy + 1

    # The client walks away mid-stream: its answer stops and the place is free at once.
    stream.close()
    assert wait_idle(server) < 5.0
    start = time.monotonic()
    reply = client.chat.completions.create(model=MODEL, messages=[user(PROMPT, url)],
                                           max_tokens=TOKENS)
    assert reply.choices[0].finish_reason == 'length' and time.monotonic() - start < 5.0

    # The same for an unstreamed request whose client gives up waiting.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + '/chat/completions', timeout=httpx.Timeout(10.0, read=0.5),
                   headers={'Authorization': f'Bearer {KEY}'},
                   json={'model': MODEL, 'messages': [user(PROMPT, url)], 'max_tokens': 6000,
                         'ignore_eos': True})
    assert wait_idle(server) < 5.0
    assert metric(server, 'vlm_serve_requests_total', outcome='cancelled') == cancelled + 2
    assert client.chat.completions.create(model=MODEL, messages=[user(PROMPT, url)],
                                          max_tokens=2).choices[0].finish_reason == 'length'


# Configuration ---------------------------------------------------------------------------

def test_params_file_and_shutdown_mid_answer(model_dir, pipe, tmp_path):
    params = tmp_path / 'params.yaml'
    params.write_text(f'/**:\n  ros__parameters:\n    model_type: 1\n'
                      f'    model_dir: {model_dir}\n    max_new_tokens: 7\n'
                      f'    system_prompt: "Be brief."\n    queue_size: 3\n'
                      f'vlm_node:\n  ros__parameters:\n    n_threads: 1\n    feed_type: 1\n')
    srv = ServeProcess(tmp_path, '--params-file', params).wait_ready()
    try:
        health = httpx.get(srv.base + '/health').json()
        assert health['queue_capacity'] == 3 and health['model'] == model_dir.name
        local = openai.OpenAI(base_url=srv.url, api_key='unused', max_retries=0)
        # The node's defaults apply: do_image_splitting false among them.
        expected = pipe.generate(frame(0), PROMPT, 'Be brief.', max_new_tokens=7,
                                 image_options=ImageOptions(do_image_splitting=False))
        reply = local.chat.completions.create(model=model_dir.name,
                                              messages=[user(PROMPT, data_url(frame(0)))])
        assert reply.choices[0].message.content == expected.text
        assert reply.usage.completion_tokens == expected.completion_tokens

        # SIGINT while answering: the stream ends with an error at once, the process exits 0.
        stream = local.chat.completions.create(
            model=model_dir.name, messages=[user(PROMPT, data_url(frame(0)))], stream=True,
            **LONG)
        chunks = iter(stream)
        assert next(chunks).choices[0].delta.content
        start = time.monotonic()
        srv.proc.send_signal(signal.SIGINT)
        with pytest.raises(openai.APIError, match='shutting down'):
            for _ in chunks:
                pass
        assert srv.proc.wait(15) == 0 and time.monotonic() - start < 10.0
    finally:
        srv.stop()


def test_params_file_with_a_remote_backend_relays(server, tmp_path, monkeypatch):
    """A parameters file with backend: remote makes vlm_serve a relay to another server."""
    params = tmp_path / 'relay.yaml'
    params.write_text(f'/**:\n  ros__parameters:\n    backend: remote\n'
                      f'    remote_url: {server.url}\n    remote_model: {MODEL}\n'
                      f'    remote_api_key_env: {KEY_ENV}\n    max_new_tokens: {TOKENS}\n')
    relay = ServeProcess(tmp_path, '--params-file', params, env={KEY_ENV: KEY}).wait_ready()
    try:
        local = openai.OpenAI(base_url=relay.url, api_key='unused', max_retries=0)
        reply = local.chat.completions.create(model=MODEL,
                                              messages=[user(PROMPT, data_url(frame(6)))])
        # The relay sends the image on as the node's remote backend does (JPEG): the same
        # request from a RemoteClient gets the same answer.
        monkeypatch.setenv(KEY_ENV, KEY)
        direct = RemoteClient(server.url, MODEL, api_key_env=KEY_ENV).generate(
            frame(6), PROMPT, max_new_tokens=TOKENS)
        assert reply.choices[0].message.content == direct.text
        assert reply.usage.completion_tokens == direct.completion_tokens == TOKENS
        assert reply.usage.prompt_tokens == direct.prompt_tokens
    finally:
        assert relay.stop() == 0
    assert KEY not in relay.output()


def test_command_line_errors(tmp_path):
    exe = str(installed_executable('vlm_ros', 'vlm_serve'))
    env = {k: v for k, v in os.environ.items() if k != 'VLM_TEST_UNSET'}
    out = subprocess.run([exe, '--api-key-env', 'VLM_TEST_UNSET'], capture_output=True,
                         text=True, env=env, timeout=60)
    assert out.returncode == 2 and 'VLM_TEST_UNSET, which is not set' in out.stderr
    out = subprocess.run([exe, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and 'config.json' in out.stderr
    bad = tmp_path / 'bad.yaml'
    bad.write_text('/**:\n  ros__parameters:\n    max_new_tokens: lots\n')
    out = subprocess.run([exe, '--params-file', str(bad)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and 'max_new_tokens must be an integer' in out.stderr
    out = subprocess.run([sys.executable, '-m', 'vlm_ros.serve', '--help'],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and '--allow-image-urls' in out.stdout


# Units: layering, request mapping and image sources --------------------------------------

def test_serve_is_an_adapter_over_the_engine_without_ros():
    """The serve package imports the engine and the web stack, never rclpy or ros/."""
    import ast
    folder = pathlib.Path(image_sources.__file__).parent
    found = {}
    for path in folder.glob('*.py'):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ''] if isinstance(node, ast.ImportFrom) else []
            bad = [n for n in names if n.split('.')[0] in ('rclpy', 'torch') or
                   n.startswith('vlm_ros.ros')]
            if bad:
                found[path.name] = bad
    assert found == {}


def test_request_mapping():
    chat = chat_request.parse({
        'model': 'm', 'messages': [
            {'role': 'system', 'content': 'S1'}, {'role': 'developer', 'content': 'S2'},
            {'role': 'user', 'content': [{'type': 'text', 'text': 'a'},
                                         {'type': 'text', 'text': 'b'}]},
            {'role': 'assistant', 'content': None}, user('q', 'data:,x', 'data:,y')],
        'max_tokens': 5, 'max_completion_tokens': 9, 'top_k': -1, 'repeat_penalty': 1.2,
        'stop': '##', 'seed': 3.0, 'stream': True, 'stream_options': {'include_usage': True},
        'user': 'ignored', 'tool_choice': 'none'}, 'm', 'default system')
    assert (chat.system_prompt, chat.history, chat.prompt) == ('S1\nS2', ['a\nb', ''], 'q')
    assert [r.where for r in chat.images] == ['messages[4].content[0]',
                                              'messages[4].content[1]']
    assert chat.settings == {'max_new_tokens': 9, 'top_k': 0, 'seed': 3,
                             'repetition_penalty': 1.2, 'stop': ('##',)}
    assert chat.stream and chat.include_usage
    plain = chat_request.parse({'model': 'm', 'messages': [user('q')]}, 'm', 'default system')
    assert plain.system_prompt == 'default system' and plain.settings == {}
    for body, why in (({'messages': [user('q')]}, 'model is required'),
                      ({'model': 'm', 'messages': []}, 'non-empty list'),
                      ({'model': 'm', 'messages': [user('q'), {'role': 'system',
                                                               'content': 's'}]},
                       'before the conversation'),
                      ({'model': 'm', 'messages': [{'role': 'tool', 'content': 'x'}]},
                       'tool and function calls'),
                      ({'model': 'm', 'messages': [user('q')], 'stop': ['']}, 'stop must be'),
                      ({'model': 'm', 'messages': [user('q')], 'seed': -5}, 'seed must be in'),
                      ({'model': 'm', 'messages': [user('q')], 'stream': 'yes'},
                       'stream must be true or false')):
        with pytest.raises(ApiError, match=why) as err:
            chat_request.parse(body, 'm')
        assert err.value.status == 400


def load(url, policy, client=None):
    return asyncio.run(image_sources.load(image_sources.ImageRef(url, 'img'), policy, client))


def test_image_sources_are_off_unless_enabled(tmp_path):
    (tmp_path / 'a.png').write_bytes(b'png bytes')
    closed = image_sources.ImagePolicy()
    with pytest.raises(ApiError, match='file:// image URLs are disabled'):
        load(f'file://{tmp_path}/a.png', closed)
    with pytest.raises(ApiError, match='over https are disabled'):
        load('https://example.org/a.png', closed)
    assert load('data:image/png;base64,' + base64.b64encode(b'abc').decode(), closed) == b'abc'
    small = image_sources.ImagePolicy(image_dir=tmp_path, max_bytes=4)
    with pytest.raises(ApiError, match='larger than'):
        load(f'file://{tmp_path}/a.png', small)
    with pytest.raises(ApiError, match='larger than'):
        load('data:image/png;base64,' + base64.b64encode(b'x' * 64).decode(), small)


def test_http_images_when_allowed():
    """--allow-image-urls: fetched with a size limit and a whole-fetch timeout."""
    requests = []

    async def handler(request):
        requests.append(str(request.url))
        if request.url.path == '/slow':
            await asyncio.sleep(5)
        if request.url.path == '/missing':
            return httpx.Response(404)
        return httpx.Response(200, content=b'y' * (100 if request.url.path == '/big' else 10))

    policy = image_sources.ImagePolicy(allow_http=True, max_bytes=50, fetch_timeout_s=0.3)

    async def fetch(path):
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
            return await image_sources.load(
                image_sources.ImageRef(f'http://camera.local{path}?token=s3cret', 'img'),
                policy, http)

    assert asyncio.run(fetch('/ok')) == b'y' * 10
    for path, why in (('/big', 'larger than'), ('/missing', 'HTTP 404'),
                      ('/slow', 'longer than 0.3 s')):
        with pytest.raises(ApiError, match=why) as err:
            asyncio.run(fetch(path))
        assert 's3cret' not in err.value.message and 'http://camera.local' in err.value.message
    assert len(requests) == 4
