"""
The remote backend against a real OpenAI-compatible server: llama-cpp-python's own server.

``python -m llama_cpp.server`` serves the tiny SmolVLM as GGUF + mmproj with its ``mtmd``
chat handler, so images really go through llama.cpp's projector. The reference for every
answer is what the same server returns to the official ``openai`` client. Failures use real
sockets on 127.0.0.1: a port with no server, a listener that accepts and never answers, a
server killed mid-answer and a server restarted with another API key.

The served language model is the tiny test model's, exported with one spare special token
renamed to a double newline: libmtmd lays out an idefics3 image with a double-newline token
that the tiny vocabulary lacks, and llama-cpp-python's handler would pass the missing id (-1)
to llama_decode. The engine's own mtmd runtime works around that; the server cannot.
"""

import base64
import io
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

from conftest import REPO
import httpx
from lifecycle_msgs.msg import Transition
from lifecycle_msgs.srv import ChangeState, GetState
import numpy as np
from PIL import Image as PilImage
import pytest
from sensor_msgs.msg import Image
from vlm_ros.engine.datatypes import GenerationConfig
from vlm_ros.engine.errors import (RemoteConfigError, RemoteRequestError, RemoteServerError,
                                   RemoteStreamError, RemoteTimeoutError,
                                   RemoteUnreachableError)
from vlm_ros.engine.remote import check_remote_settings, RemoteClient
from vlm_ros_interfaces.srv import Detect, Query

pytest.importorskip('llama_cpp.server')
openai = pytest.importorskip('openai')
pytest.importorskip('torch')
from vlm_ros_tools import eval_default, scenes  # noqa: E402
from vlm_ros_tools.export_onnx import cached_test_model  # noqa: E402
from vlm_ros_tools.gguf_export import cached_mmproj, export_text_gguf  # noqa: E402

MODEL = 'tiny-smolvlm'
KEY = 'test-key-7f3a'
KEY_ENV = 'VLM_TEST_REMOTE_KEY'
PROMPT = 'What is in the picture?'
TOKENS = 12
# Greedy with a repetition bonus: the tiny model rambles for many seconds on this request
# (checked in the test that uses it), long enough to kill the server in the middle.
LONG = {'max_new_tokens': 400, 'repetition_penalty': 0.8}
# The same, short enough that the server, which only notices a closed stream when it next
# writes, is done with it at once.
SHORTER = {'max_new_tokens': 80, 'repetition_penalty': 0.8}
# The embedded default model as llama.cpp files: language model and projector (mmproj).
DEFAULT_MODEL = REPO / 'vlm_ros' / 'models' / 'default'
DEFAULT_GGUF = 'gguf/model-f16.gguf'
DEFAULT_MMPROJ = 'gguf/mmproj-f16.gguf'


def frame(seed=0, width=96, height=72):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def jpeg_url(rgb, quality=90):
    """Encode like a client would by hand: the reference for the runtime's data URL."""
    buffer = io.BytesIO()
    PilImage.fromarray(rgb).save(buffer, 'JPEG', quality=quality)
    return 'data:image/jpeg;base64,' + base64.b64encode(buffer.getvalue()).decode()


def user_message(rgb, prompt):
    return {'role': 'user', 'content': [{'type': 'image_url', 'image_url': {'url': jpeg_url(rgb)}},
                                        {'type': 'text', 'text': prompt}]}


def free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


@pytest.fixture(scope='module')
def served_model(tmp_path_factory):
    """Return (language model GGUF, mmproj GGUF) for the server (see the module docstring)."""
    model_dir = pathlib.Path(cached_test_model('a'))
    out = tmp_path_factory.mktemp('served')
    for name in ('tokenizer_config.json', 'chat_template.json'):
        shutil.copy(model_dir / name, out / name)
    tokenizer = json.loads((model_dir / 'tokenizer.json').read_text())
    spare = next(t for t in tokenizer['added_tokens']
                 if t['content'] == '<|reserved_special_token_3|>')
    spare.update(content='\n\n', special=False)
    (out / 'tokenizer.json').write_text(json.dumps(tokenizer))
    gguf = export_text_gguf(str(model_dir), str(out / 'model.gguf'), tokenizer_dir=str(out))
    return gguf, cached_mmproj('a')


class LlamaServer:
    """``python -m llama_cpp.server`` on 127.0.0.1, started and killed by the test."""

    def __init__(self, served_model, port, log_dir):
        self.gguf, self.mmproj = served_model
        self.port = port
        self.url = f'http://127.0.0.1:{port}/v1'
        self.log_path = pathlib.Path(log_dir) / f'llama_server_{port}.log'
        self.proc = None
        self._log = None

    def start(self, api_key=KEY, timeout=60.0):
        self._log = open(self.log_path, 'a')
        cmd = [sys.executable, '-m', 'llama_cpp.server', '--model', self.gguf,
               '--clip_model_path', self.mmproj, '--chat_format', 'mtmd',
               '--model_alias', MODEL, '--host', '127.0.0.1', '--port', str(self.port),
               '--n_ctx', '2048', '--n_threads', '1', '--n_threads_batch', '1',
               '--verbose', 'false',
               '--api_key', api_key]
        # Unbuffered, so uvicorn's access lines reach the log as requests start.
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, 'PYTHONUNBUFFERED': '1'})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_path.read_text()[-3000:]
            try:
                httpx.get(self.url + '/models', timeout=1.0)
                return self
            except httpx.TransportError:
                time.sleep(0.05)
        raise AssertionError(f'llama_cpp.server did not start: {self.log_path.read_text()}')

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def requests_started(self):
        return self.log_path.read_text().count('"POST /v1/chat/completions HTTP/1.1" 200')


@pytest.fixture(scope='module')
def server(served_model, tmp_path_factory):
    srv = LlamaServer(served_model, free_port(), tmp_path_factory.mktemp('server')).start()
    yield srv
    srv.kill()


@pytest.fixture(scope='module')
def default_server(tmp_path_factory):
    """Serve the embedded default model's GGUF and mmproj, as shipped."""
    files = (str(DEFAULT_MODEL / DEFAULT_GGUF), str(DEFAULT_MODEL / DEFAULT_MMPROJ))
    srv = LlamaServer(files, free_port(), tmp_path_factory.mktemp('default_server')).start()
    yield srv
    srv.kill()


@pytest.fixture
def own_server(served_model, tmp_path):
    """Return a server of the test's own, not started, to kill and restart at will."""
    srv = LlamaServer(served_model, free_port(), tmp_path)
    yield srv
    srv.kill()


@pytest.fixture
def key_env(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    return KEY_ENV


class SilentListener:
    """Accepts connections on 127.0.0.1 and never sends a byte; counts the connections."""

    def __init__(self, port=0):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(('127.0.0.1', port))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.accepted = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def close(self):
        # shutdown first: a bare close leaves the socket listening under the blocked accept.
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._thread.join(5)
        for conn in self.accepted:
            conn.close()


def openai_reference(server, messages, **settings):
    """
    Ask the server the same request with the official client: (text, finish_reason, usage).

    The text and finish reason come from a streamed request, like the runtime's: this
    server drops a character split across tokens when streaming but not otherwise. Usage
    comes from an unstreamed request, because this server sends none in streams.
    """
    client = openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0)
    # The runtime always sends llama.cpp's repeat_penalty (this server's default is 1.1).
    settings.setdefault('extra_body', {'repeat_penalty': 1.0})
    stream = client.chat.completions.create(model=MODEL, messages=messages, stream=True,
                                            stream_options={'include_usage': True},
                                            **settings)
    chunks = [chunk for chunk in stream if chunk.choices]
    text = ''.join(chunk.choices[0].delta.content or '' for chunk in chunks)
    finish = chunks[-1].choices[0].finish_reason
    full = client.chat.completions.create(model=MODEL, messages=messages, **settings)
    return text, finish, full.usage


# Engine ---------------------------------------------------------------------------------

def test_answers_equal_the_openai_client(server, key_env):
    runtime = RemoteClient(server.url, MODEL, api_key_env=key_env)
    system = 'Answer briefly.'
    # With this server's own repeat penalty, 1.1, every token of these answers streams as a
    # chunk of its own (the token count below is one per chunk).
    for rgb, prompt, seed in ((frame(0), PROMPT, 3), (frame(1), 'Describe this image.', 11)):
        deltas = []
        result = runtime.generate(rgb, prompt, system, max_new_tokens=TOKENS, temperature=0.0,
                                  seed=seed, repetition_penalty=1.1, on_text=deltas.append)
        messages = [{'role': 'system', 'content': system}, user_message(rgb, prompt)]
        text, finish, usage = openai_reference(
            server, messages, max_tokens=TOKENS, temperature=0.0, top_p=1.0, seed=seed,
            extra_body={'repeat_penalty': 1.1})
        assert result.text == text
        assert ''.join(deltas) == result.text and len(deltas) > 1
        assert result.finish_reason == finish == 'length'
        assert result.completion_tokens == usage.completion_tokens
        # llama_cpp.server sends no usage in streams: the prompt count is unknown (0).
        assert result.prompt_tokens in (0, usage.prompt_tokens)
        t = result.timings
        assert t.vision_ms == 0 and t.preprocess_ms > 0 and t.prefill_ms > 0
        assert t.total_ms >= t.preprocess_ms + t.prefill_ms + t.decode_ms - 1.0
    # The image is really consumed: its tokens count, and other pixels change the answer.
    text_only = openai_reference(server, [{'role': 'user', 'content': [
        {'type': 'text', 'text': PROMPT}]}], max_tokens=TOKENS, temperature=0.0)
    assert usage.prompt_tokens > text_only[2].prompt_tokens + 100
    answers = {runtime.generate(frame(s), PROMPT, max_new_tokens=TOKENS).text for s in (0, 1)}
    assert len(answers) == 2
    # Pipeline's calling conventions work unchanged.
    assert runtime((PROMPT, frame(0)), max_new_tokens=TOKENS, seed=3).text == \
        runtime.generate(frame(0), PROMPT, max_new_tokens=TOKENS, seed=3).text
    stream = runtime.stream(frame(0), PROMPT, max_new_tokens=TOKENS)
    assert ''.join(stream) == stream.result.text != ''
    runtime.close()


def test_request_mapping_and_image_encoding(tmp_path):
    runtime = RemoteClient('http://127.0.0.1:9/v1/', 'm', image_max_side=64)
    assert runtime.endpoint == 'http://127.0.0.1:9/v1/chat/completions'
    body = runtime.request_body(GenerationConfig(max_new_tokens=7, temperature=0.5, top_p=0.9,
                                                 seed=4, stop=('###',)))
    assert body == {'model': 'm', 'messages': [], 'max_tokens': 7, 'temperature': 0.5,
                    'top_p': 0.9, 'seed': 4, 'stop': ['###'], 'stream': True,
                    'stream_options': {'include_usage': True}, 'repetition_penalty': 1.0,
                    'repeat_penalty': 1.0}
    extra = runtime.request_body(GenerationConfig(top_k=20, repetition_penalty=1.2))
    assert extra['top_k'] == 20 and extra['repetition_penalty'] == extra['repeat_penalty'] == 1.2
    assert 'seed' not in extra and 'stop' not in extra
    # Downscaled once, aspect kept, JPEG; a small image is sent at its own size.
    url = runtime.encode_image(frame(width=300, height=200))
    assert url.startswith('data:image/jpeg;base64,')
    sent = PilImage.open(io.BytesIO(base64.b64decode(url.split(',', 1)[1])))
    assert sent.format == 'JPEG' and sent.size == (64, 43)
    assert runtime.encode_image(frame(width=40, height=30)) == jpeg_url(frame(width=40,
                                                                              height=30))
    path = tmp_path / 'x.png'
    PilImage.fromarray(frame()).save(path)
    png = RemoteClient('http://h/v1', 'm', image_format='png').encode_image(str(path))
    assert png.startswith('data:image/png;base64,')
    for url, model, env, why in (('ftp://h/v1', 'm', '', 'http:// or https://'),
                                 ('http:///v1', 'm', '', 'with a host'),
                                 ('http://h/v1', ' ', '', 'remote_model'),
                                 ('http://h/v1', 'm', 'VLM_TEST_UNSET_KEY', 'not set')):
        with pytest.raises(RemoteConfigError, match=why):
            check_remote_settings(url, model, env)
    assert 'key' not in repr(RemoteClient('http://h/v1', 'm')).lower()


def test_unreachable_server_is_retried_then_named(caplog):
    port = free_port()
    url = f'http://127.0.0.1:{port}/v1'
    runtime = RemoteClient(url, MODEL, max_retries=2)
    start = time.monotonic()
    with pytest.raises(RemoteUnreachableError, match='3 attempts') as err:
        runtime.generate(frame(), PROMPT)
    assert url in str(err.value) and 'refused' in str(err.value).lower()
    assert time.monotonic() - start >= 0.7  # two pauses: 0.25 s, then 0.5 s
    retries = [r.getMessage() for r in caplog.records if r.name == 'vlm_ros.remote']
    assert len(retries) == 2 and 'retry 2 of 2' in retries[-1]
    caplog.clear()
    with pytest.raises(RemoteUnreachableError, match='1 attempt'):
        RemoteClient(url, MODEL, max_retries=0).generate(None, PROMPT)
    assert not caplog.records


def test_silent_server_times_out_without_retry():
    listener = SilentListener()
    try:
        runtime = RemoteClient(f'http://127.0.0.1:{listener.port}/v1', MODEL,
                               read_timeout_s=0.5, max_retries=3)
        start = time.monotonic()
        with pytest.raises(RemoteTimeoutError, match='no response within 0.5 s'):
            runtime.generate(frame(), PROMPT)
        assert 0.45 <= time.monotonic() - start < 3.0
        assert len(listener.accepted) == 1  # the request went out: never sent twice
    finally:
        listener.close()


def test_cancel_while_the_server_is_silent():
    """should_stop cuts the connection at once, even with no byte coming (node deactivation)."""
    listener = SilentListener()
    try:
        runtime = RemoteClient(f'http://127.0.0.1:{listener.port}/v1', MODEL,
                               read_timeout_s=30.0)
        start = time.monotonic()
        result = runtime.generate(frame(), PROMPT,
                                  should_stop=lambda: time.monotonic() - start > 0.3)
        assert result.finish_reason == 'cancelled' and result.text == ''
        assert time.monotonic() - start < 2.0
    finally:
        listener.close()


def test_http_errors_carry_the_servers_message(server, key_env, monkeypatch):
    monkeypatch.setenv('VLM_TEST_WRONG_KEY', 'not-the-key')
    wrong = RemoteClient(server.url, MODEL, api_key_env='VLM_TEST_WRONG_KEY')
    with pytest.raises(RemoteRequestError, match='HTTP 401: Invalid API key') as err:
        wrong.generate(frame(), PROMPT)
    assert err.value.status_code == 401 and err.value.server_message == 'Invalid API key'
    assert 'not-the-key' not in str(err.value)
    base = server.url.rsplit('/v1', 1)[0]
    with pytest.raises(RemoteRequestError, match='HTTP 404: Not Found'):
        RemoteClient(base + '/v2', MODEL, api_key_env=key_env).generate(None, PROMPT)
    # A field the server's validation rejects: a 5xx with its own explanation.
    bad = RemoteClient(server.url, MODEL, api_key_env=key_env, extra_body={'top_k': -1})
    with pytest.raises(RemoteServerError, match='(?s)HTTP 500: .*top_k.*greater than or equal'):
        bad.generate(None, PROMPT)
    good = RemoteClient(server.url, MODEL, api_key_env=key_env)
    assert good.generate(frame(), PROMPT, max_new_tokens=4).finish_reason == 'length'


def test_stream_ending_without_done_is_an_error(server, key_env):
    # Over the server's context, llama-cpp-python fails after starting the stream and ends
    # it cleanly but empty: a truncated answer, not an empty one.
    runtime = RemoteClient(server.url, MODEL, api_key_env=key_env)
    with pytest.raises(RemoteStreamError, match='ended without \\[DONE\\] after 0 events'):
        runtime.generate(None, 'hello ' * 3000)
    assert runtime.generate(None, PROMPT, max_new_tokens=4).finish_reason == 'length'


def test_cancel_closes_the_stream(server, key_env):
    runtime = RemoteClient(server.url, MODEL, api_key_env=key_env)
    deltas = []
    result = runtime.generate(frame(0), PROMPT, on_text=deltas.append,
                              should_stop=lambda: len(deltas) >= 1, **SHORTER)
    assert result.finish_reason == 'cancelled' and result.text == deltas[0]
    # The server notices the closed connection and serves the next request normally.
    assert runtime.generate(frame(0), PROMPT, max_new_tokens=TOKENS).finish_reason == 'length'


def test_server_killed_mid_stream(own_server, key_env):
    own_server.start()
    runtime = RemoteClient(own_server.url, MODEL, api_key_env=key_env, max_retries=2)
    deltas = []

    def kill_on_first_text(text):
        deltas.append(text)
        if len(deltas) == 1:
            own_server.kill()

    with pytest.raises(RemoteStreamError, match='stream .* was cut off after') as err:
        runtime.generate(frame(0), PROMPT, on_text=kill_on_first_text, **LONG)
    assert own_server.url in str(err.value) and len(deltas) >= 1
    own_server.start()
    assert runtime.generate(frame(0), PROMPT, max_new_tokens=TOKENS).finish_reason == 'length'


# Node -----------------------------------------------------------------------------------

def image_msg(rgb):
    h, w = rgb.shape[:2]
    return Image(height=h, width=w, encoding='rgb8', step=w * 3, data=rgb.tobytes())


def remote_args(url, *extra):
    # feed_type 1: no answer to the bundled sample image at activation, only our queries.
    return ['-p', 'backend:=remote', '-p', f'remote_url:={url}', '-p',
            f'remote_model:={MODEL}', '-p', f'remote_api_key_env:={KEY_ENV}',
            '-p', f'max_new_tokens:={TOKENS}', '-p', 'feed_type:=1', *extra]


def query(client, **fields):
    return client.call(Query, '/vlm_node/query', Query.Request(**fields), timeout=60)


def wait_active(client, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = client.call(GetState, '/vlm_node/get_state', GetState.Request(),
                            resend_every=5.0)
        if state.current_state.label == 'active':
            return True
        time.sleep(0.1)
    return False


def long_query_started(client, server, image):
    """Send the long query from a thread; return (thread, answer dict) once it is served."""
    before = server.requests_started()
    answer = {}
    thread = threading.Thread(target=lambda: answer.update(
        r=query(client, image=image, prompt=PROMPT, **LONG)))
    thread.start()
    deadline = time.monotonic() + 20
    while server.requests_started() == before:
        assert time.monotonic() < deadline, 'the server never started answering'
        time.sleep(0.01)
    return thread, answer


def test_node_query_is_answered_by_the_server(server, node_process, ros_client):
    node = node_process(*remote_args(server.url), env={KEY_ENV: KEY})
    assert wait_active(ros_client)
    assert node.wait_for_output(f'remote backend at {server.url}')
    assert node.wait_for_output(f'sessions created (remote client for {server.url})')
    rgb = frame(2)
    response = query(ros_client, image=image_msg(rgb), prompt=PROMPT, seed=5)
    text, finish, usage = openai_reference(server, [user_message(rgb, PROMPT)],
                                           max_tokens=TOKENS, temperature=0.0, top_p=1.0,
                                           seed=5)
    assert response.success, response.error
    assert response.text == text and response.finish_reason == finish == 'length'
    assert response.completion_tokens == usage.completion_tokens == TOKENS
    assert response.prompt_tokens in (0, usage.prompt_tokens)
    assert response.vision_ms == 0 and response.preprocess_ms > 0
    assert response.prefill_ms > 0 and response.total_ms >= response.prefill_ms
    short = query(ros_client, image=image_msg(rgb), prompt=PROMPT, seed=5, max_new_tokens=3)
    assert short.success and short.completion_tokens == 3 and text.startswith(short.text)
    assert KEY not in node.output()


def test_node_reports_remote_failures_and_keeps_serving(own_server, node_process, ros_client,
                                                        key_env):
    """One node, one port: a silent listener, nothing, a dying server, a rotated key."""
    # ... and last, deactivation while the server is busy answering.
    # The mid-answer kill below needs this request to stream for seconds: check that it
    # still runs after 1.5 s (the tiny model rambles; llama-cpp-python holds text back until
    # it is valid UTF-8, so the answer arrives slowly and in bursts).
    own_server.start()
    runtime = RemoteClient(own_server.url, MODEL, api_key_env=key_env)
    started = time.monotonic()
    probe = runtime.generate(frame(0), PROMPT,
                             should_stop=lambda: time.monotonic() - started > 1.5, **LONG)
    assert probe.finish_reason == 'cancelled', 'the long request ended within 1.5 s'
    assert time.monotonic() - started < 3.0  # cancelled while the server was silent
    own_server.kill()
    rgb = image_msg(frame(0))

    listener = SilentListener(own_server.port)
    node = node_process(*remote_args(own_server.url, '-p', 'remote_read_timeout_s:=2.5',
                                     '-p', 'remote_max_retries:=2'), env={KEY_ENV: KEY})
    assert wait_active(ros_client)
    silent = query(ros_client, image=rgb, prompt=PROMPT)
    listener.close()
    assert not silent.success and 'no response within 2.5 s' in silent.error
    assert len(listener.accepted) == 1

    refused = query(ros_client, image=rgb, prompt=PROMPT)
    assert not refused.success
    assert f'cannot reach the server at {own_server.url}' in refused.error
    assert '3 attempts' in refused.error and 'refused' in refused.error.lower()

    own_server.start()
    assert query(ros_client, image=rgb, prompt=PROMPT).success

    # Killed while answering: the stream is cut off, never retried.
    thread, answer = long_query_started(ros_client, own_server, rgb)
    time.sleep(0.8)  # well inside the answer (seconds, as checked above)
    own_server.kill()
    thread.join(30)
    cut = answer['r']
    assert not cut.success and 'was cut off after' in cut.error, cut.error
    own_server.start()
    assert query(ros_client, image=rgb, prompt=PROMPT).success

    # The server comes back with a rotated key: its 401 and message reach the caller.
    own_server.kill()
    own_server.start(api_key='rotated-key')
    rejected = query(ros_client, image=rgb, prompt=PROMPT)
    assert not rejected.success and 'HTTP 401: Invalid API key' in rejected.error
    own_server.kill()
    own_server.start()
    back = query(ros_client, image=rgb, prompt=PROMPT)
    assert back.success and back.completion_tokens == TOKENS
    state = ros_client.call(GetState, '/vlm_node/get_state', GetState.Request(),
                            resend_every=5.0)
    assert state.current_state.label == 'active'

    # Deactivation cancels a request the server is still working on, at once.
    thread, answer = long_query_started(ros_client, own_server, rgb)
    time.sleep(0.5)
    started = time.monotonic()
    assert ros_client.call(ChangeState, '/vlm_node/change_state', ChangeState.Request(
        transition=Transition(id=Transition.TRANSITION_DEACTIVATE))).success
    thread.join(30)
    assert time.monotonic() - started < 3.0
    assert answer['r'].finish_reason == 'cancelled' and 'node deactivated' in answer['r'].error
    assert node.wait_for_output('sessions released')
    assert KEY not in node.output() and 'rotated-key' not in node.output()


def test_node_configure_checks_remote_settings(node_process, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    node = node_process(*remote_args('ftp://127.0.0.1/v1'), name='bad_url')
    assert node.wait_for_output('configure failed: remote_url must be an http://')
    node.stop()
    node = node_process(*remote_args('http://127.0.0.1:9/v1'), name='no_key')
    assert node.wait_for_output(f'configure failed: remote_api_key_env names the environment '
                                f'variable {KEY_ENV}, which is not set')


def test_node_detections_through_the_server_equal_the_engines(
        default_server, node_process, ros_client):
    """
    ~/detect through the server gives the boxes the engine gives on the same files.

    The server runs the default model's GGUF and mmproj; the reference is the engine's own
    llama.cpp + libmtmd path on those files, asked about the picture the server receives
    (PNG: pixel for pixel; the larger scene downscaled first, as the backend sends it).
    Boxes come back on the image the caller sent, and find the shape.
    """
    import vlm_ros
    from vlm_ros.engine import grounding

    max_side = 160
    node = node_process(*remote_args(default_server.url, '-p', 'max_new_tokens:=48', '-p',
                                     'remote_image_format:=png', '-p',
                                     f'remote_image_max_side:={max_side}'),
                        env={KEY_ENV: KEY})
    assert wait_active(ros_client), node.output()
    engine = vlm_ros.pipeline(str(DEFAULT_MODEL), vision_model=DEFAULT_MMPROJ,
                              decoder_model=DEFAULT_GGUF, n_threads=1, max_new_tokens=48)
    sender = RemoteClient(default_server.url, MODEL, image_max_side=max_side)
    # Lone shapes, which the model boxes reliably (its model card).
    rng = scenes.scene_rng(1, 12)
    try:
        for side in (128, 400):
            scene = scenes.random_scene(rng, count=1)
            item = scene.items[0]
            label = f'{item.colour} {item.shape}'
            rgb = scenes.render(scene, side)
            response = ros_client.call(Detect, '/vlm_node/detect',
                                       Detect.Request(image=image_msg(rgb), labels=[label]),
                                       timeout=60)
            assert response.success, response.error
            seen = sender.sent_size(side, side)
            assert (seen[0] < side) == (side > max_side)
            picture = rgb if seen == (side, side) else np.asarray(
                PilImage.fromarray(rgb).resize(seen, PilImage.LANCZOS))
            questions = grounding.prompts(grounding.INTERNVL_PROMPT, [label])
            reference = grounding.detect(engine, [picture], questions)
            assert response.text == reference.text, (side, label)
            scale = side / seen[0]
            [expected] = reference.detections
            [found] = response.detections.detections
            assert found.label == expected.label == label
            assert found.center_x == pytest.approx((expected.x1 + expected.x2) / 2 * scale)
            assert found.center_y == pytest.approx((expected.y1 + expected.y2) / 2 * scale)
            assert found.size_x == pytest.approx((expected.x2 - expected.x1) * scale)
            assert found.size_y == pytest.approx((expected.y2 - expected.y1) * scale)
            box = (found.center_x - found.size_x / 2, found.center_y - found.size_y / 2,
                   found.center_x + found.size_x / 2, found.center_y + found.size_y / 2)
            truth = tuple(v * side for v in item.box)
            assert eval_default.iou(box, truth) >= 0.5, (response.text, truth)
    finally:
        engine.close()
