"""
The engine and the node on the tiny test models, without torch (the Humble stand-in).

The models come through ``vlm_ros_tools.model_cache``: where torch is installed it builds them
(and records them in the cache's manifest); in the Humble stand-in it finds what the Kilted
environment built (``scripts/test.sh`` refreshes the manifest first), and a test skips with
the reason when a model is not there. The transformers reference needs torch, so these tests
check the runtime paths against each other in this environment -- the Kilted suite checks
each of them against transformers -- and exercise the version-sensitive parts: image decoding
and resampling (Pillow, OpenCV, numpy), ONNX Runtime, tokenizers, llama.cpp with gguf-py's
readers, Jinja2 chat templates, httpx streaming, and the node over rclpy.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
from PIL import Image
import pytest
import vlm_ros
from vlm_ros_tools import model_cache

PROMPT = 'What is in the picture?'
NEW_TOKENS = 10


def _model(builder, *args):
    try:
        return builder(*args)
    except model_cache.NotCached as exc:
        pytest.skip(str(exc))


def _image(kind='wide', seed=0):
    rng = np.random.default_rng(seed)
    w, h = {'wide': (320, 120), 'tall': (90, 200), 'square': (160, 160)}[kind]
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1)
    return np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)


def _tokens(pipe, image, **overrides):
    return pipe.generate(image, PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True,
                         **overrides).token_ids


@pytest.fixture(scope='module', params=['a', 'b'])
def smolvlm(request):
    variant = request.param
    model_dir = _model(model_cache.cached_test_model, variant)
    return variant, model_dir, vlm_ros.pipeline(model_dir, n_threads=1)


def test_onnx_fp32_int8_and_encoded_images(smolvlm, tmp_path):
    """fp32 and int8 graphs answer; PNG/JPEG files and bytes decode like the array."""
    _, model_dir, pipe = smolvlm
    image = _image('wide')
    ids = _tokens(pipe, image)
    assert len(ids) == NEW_TOKENS
    png = tmp_path / 'frame.png'
    Image.fromarray(image).save(png)
    assert _tokens(pipe, str(png)) == ids
    assert _tokens(pipe, png.read_bytes()) == ids
    gray = Image.fromarray(image).convert('L')
    assert _tokens(pipe, gray) == _tokens(pipe, np.asarray(gray))
    jpeg = tmp_path / 'frame.jpg'
    Image.fromarray(image).save(jpeg, quality=95)
    assert len(_tokens(pipe, str(jpeg))) == NEW_TOKENS
    int8 = vlm_ros.pipeline(model_dir, variant='int8', n_threads=1)
    assert len(_tokens(int8, image)) == NEW_TOKENS


CASES = [(kind, seed) for kind in ('wide', 'tall', 'square') for seed in range(3)]


def _agreement(pipe, other):
    """Return (cases whose first tokens agree, cases whose whole answers agree)."""
    first = whole = 0
    for kind, seed in CASES:
        a, b = _tokens(pipe, _image(kind, seed)), _tokens(other, _image(kind, seed))
        first += a[:1] == b[:1]
        whole += a == b
    return first, whole


def test_llamacpp_decoder_agrees_with_onnx(smolvlm):
    """
    The ONNX vision encoder feeding a llama.cpp f32 GGUF answers like ONNX alone.

    Random tiny models have near ties that the two runtimes' float rounding breaks apart
    now and then, so a few answers may part after their first token (Kilted: 7 of 9).
    """
    variant, model_dir, onnx = smolvlm
    gguf = vlm_ros.pipeline(model_dir, decoder_model=_model(model_cache.cached_gguf, variant,
                                                            'f32'), n_threads=1)
    first, whole = _agreement(gguf, onnx)
    assert first == len(CASES) and whole >= len(CASES) - 3, (first, whole)


@pytest.mark.parametrize('ftype', ['f16', 'q8_0', 'q4_0'])
def test_quantized_gguf_answers(smolvlm, ftype):
    variant, model_dir, _ = smolvlm
    pipe = vlm_ros.pipeline(model_dir, decoder_model=_model(model_cache.cached_gguf, variant,
                                                            ftype), n_threads=1)
    ids = _tokens(pipe, _image('wide'))
    assert len(ids) == NEW_TOKENS


def test_mmproj_projector_agrees_on_the_first_token(smolvlm):
    """llama.cpp's own projector (libmtmd) with the GGUF decoder starts like ONNX."""
    variant, model_dir, onnx = smolvlm
    pipe = vlm_ros.pipeline(model_dir,
                            vision_model=_model(model_cache.cached_mmproj, variant, 'f32'),
                            decoder_model=_model(model_cache.cached_gguf, variant, 'f32'),
                            n_threads=1)
    image = _image('square', 5)
    ids = _tokens(pipe, image)
    assert len(ids) == NEW_TOKENS and ids[0] == _tokens(onnx, image)[0]


# How far a block format's rows may be from the f32 ones, relative to their largest value.
ROW_TOLERANCE = {'f32': 0.0, 'f16': 1e-3, 'q8_0': 0.02, 'q4_0': 0.2}


@pytest.mark.parametrize('ftype', ['f32', 'f16', 'q8_0', 'q4_0'])
def test_gguf_token_rows_are_readable(ftype):
    """
    gguf-py reads the token-embedding rows of every GGUF type (the whole-prompt prefill).

    When it cannot, the llama.cpp decoder silently falls back to the slower prefill in
    alternate token and embedding batches, so the answers alone would not show it. gguf-py's
    block formats (Q8_0, Q4_0) need numpy >= 1.23 ("To change to a dtype of a different
    size, the array must be C-contiguous" on Ubuntu 22.04's numpy 1.21).
    """
    from vlm_ros.engine.gguf_file import TensorRows

    rows = TensorRows.from_file(_model(model_cache.cached_gguf, 'a', ftype), 'token_embd.weight')
    assert rows is not None, f'gguf-py cannot read {ftype} token rows here'
    exact = TensorRows.from_file(_model(model_cache.cached_gguf, 'a', 'f32'),
                                 'token_embd.weight')
    ids = [0, 1, 17, rows.count - 1]
    got, want = rows(ids), exact(ids)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= ROW_TOLERANCE[ftype] * np.abs(want).max()


@pytest.mark.parametrize('variant', ['a', 'b'])
def test_internvl_onnx_and_gguf(variant):
    model_dir = _model(model_cache.cached_internvl_model, variant)
    onnx = vlm_ros.pipeline(model_dir, n_threads=1)
    gguf = vlm_ros.pipeline(model_dir, n_threads=1, decoder_model=_model(
        model_cache.cached_internvl_gguf, variant, 'f32'))
    first, whole = _agreement(gguf, onnx)
    assert first == len(CASES) and whole >= len(CASES) - 3, (first, whole)


@pytest.mark.ros
def test_node_answers_like_the_library(node_process, ros_client):
    """vlm_node on a tiny model answers a Query with the library's answer."""
    from sensor_msgs.msg import Image as ImageMsg
    from vlm_ros_interfaces.srv import Query

    try:
        from vlm_ros.engine.datatypes import ImageOptions
    except ImportError:  # before the engine refactoring
        from vlm_ros.engine.families.base import ImageOptions

    model_dir = _model(model_cache.cached_test_model, 'a')
    image = _image('wide', 7)
    # The node splits no images unless asked (do_image_splitting defaults to false).
    expected = vlm_ros.pipeline(model_dir, n_threads=1).generate(
        image, PROMPT, max_new_tokens=NEW_TOKENS,
        image_options=ImageOptions(do_image_splitting=False)).text
    node = node_process('-p', 'feed_type:=1', '-p', f'model_dir:={model_dir}',
                        '-p', f'max_new_tokens:={NEW_TOKENS}')
    assert node.wait_for_output('sessions created', timeout=60), node.output()
    h, w = image.shape[:2]
    request = Query.Request(prompt=PROMPT)
    request.image = ImageMsg(height=h, width=w, encoding='rgb8', step=w * 3,
                             data=image.tobytes())
    response = ros_client.call(Query, '/vlm_node/query', request, timeout=60)
    assert response.success, response.error
    assert response.text == expected


def _free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def test_remote_client_streams_from_llama_cpp_server(tmp_path):
    """
    The remote backend reads a real OpenAI-compatible event stream with this httpx.

    Text only: the server's image path needs the specially exported GGUF of test_remote.py
    (see its docstring), whose exporter needs torch.
    """
    pytest.importorskip('llama_cpp.server')
    import httpx
    from vlm_ros.engine.remote import RemoteClient

    gguf = _model(model_cache.cached_gguf, 'a', 'f32')
    mmproj = _model(model_cache.cached_mmproj, 'a', 'f32')
    port = _free_port()
    log = open(tmp_path / 'server.log', 'w')
    server = subprocess.Popen(
        [sys.executable, '-m', 'llama_cpp.server', '--model', gguf, '--clip_model_path', mmproj,
         '--chat_format', 'mtmd', '--model_alias', 'tiny', '--host', '127.0.0.1',
         '--port', str(port), '--n_ctx', '2048', '--n_threads', '1', '--verbose', 'false'],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, 'PYTHONUNBUFFERED': '1'})
    url = f'http://127.0.0.1:{port}/v1'
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, (tmp_path / 'server.log').read_text()[-3000:]
            try:
                httpx.get(url + '/models', timeout=1.0)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, 'llama_cpp.server did not start'
                time.sleep(0.1)
        client = RemoteClient(url, 'tiny')
        pieces = []
        result = client.generate(None, PROMPT, max_new_tokens=8, on_text=pieces.append)
        client.close()
        assert result.finish_reason in ('stop', 'length'), result
        assert result.completion_tokens >= 1 and ''.join(pieces) == result.text
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
