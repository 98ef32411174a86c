"""
The installed vlm_node under stress, from real rclpy clients: nothing lost, nothing leaked.

Bounded versions of the field trials: hundreds of varied queries with memory watched,
bursts of concurrent callers and prompts beyond the queue, fuzzed message fields
(hypothesis), signals during a request and right after activation, and the parameters that
choose files, servers and secrets refused at run time.
"""

import functools
import math
import signal
import statistics
import time

from conftest import NodeProcess, tiny_model
import cv2
from hypothesis import given, HealthCheck, settings, strategies as st
import numpy as np
import psutil
import pytest
from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
from rcl_interfaces.srv import SetParameters
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String
from test_node import (base_args, Collector, frame, get_state, image_msg, PROMPT,
                       wait_active)
from vlm_ros_interfaces.msg import Result as ResultMsg
from vlm_ros_interfaces.srv import Query


pytestmark = pytest.mark.ros
LONG_PROMPT = 'look ' * 1500  # about a second of prefill on the tiny model
# The module's long-lived node, in its own namespace so its topics and service stay apart
# from the per-test nodes'.
SERVED = 'stress/vlm_stress'
SERVED_QUERY = f'/{SERVED}/query'


cached_test_model = functools.partial(tiny_model, 'cached_test_model')


@pytest.fixture(scope='module')
def model_dir():
    return str(cached_test_model('a'))


@pytest.fixture(scope='module')
def served(tmp_path_factory, model_dir):
    """One node for the whole module (hypothesis runs many examples against it)."""
    from conftest import RosClient
    node = NodeProcess(tmp_path_factory.mktemp('stress'), '-r', '__node:=vlm_stress',
                       '-r', '__ns:=/stress',
                       *base_args(model_dir, '-p', 'max_new_tokens:=4', '-p', 'feed_type:=1'))
    client = RosClient('vlm_stress_client')
    assert wait_active(client, SERVED)
    yield node, client
    client.close()
    assert node.stop() == 0


def _varied_request(i):
    """Query requests of many sizes, encodings and compressions."""
    rng = np.random.default_rng(i)
    w, h = int(rng.integers(8, 200)), int(rng.integers(8, 200))
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    kind = i % 6
    if kind == 0:
        return Query.Request(image=image_msg(rgb, pad=int(rng.integers(0, 8))), prompt=PROMPT)
    if kind == 1:
        return Query.Request(image=image_msg(rgb, 'bgr8'), prompt=PROMPT)
    if kind == 2:
        grey = (rgb[..., 0].astype(np.uint16) * 257)
        return Query.Request(image=Image(height=h, width=w, encoding='mono16', step=2 * w,
                                         data=grey.tobytes()), prompt=PROMPT)
    if kind == 3:
        ok, data = cv2.imencode('.jpg', rgb)
        return Query.Request(compressed_image=CompressedImage(format='jpeg',
                                                              data=data.tobytes()))
    if kind == 4:
        ok, data = cv2.imencode('.png', rgb)
        return Query.Request(compressed_image=CompressedImage(format='png',
                                                              data=data.tobytes()),
                             prompt='What colour?', max_new_tokens=2)
    rgba = np.dstack([rgb, rng.integers(0, 256, (h, w), dtype=np.uint8)])
    return Query.Request(image=Image(height=h, width=w, encoding='rgba8', step=4 * w,
                                     data=rgba.tobytes()), prompt=PROMPT, temperature=0.7,
                         seed=i)


def test_500_varied_queries_keep_memory_flat(served):
    node, client = served
    proc = psutil.Process(node.proc.pid)
    for i in range(50):  # warm-up: arenas and caches reach their working size
        assert client.call(Query, SERVED_QUERY, _varied_request(i), timeout=60).success
    baseline = proc.memory_info().rss
    failures = []
    for i in range(50, 550):
        response = client.call(Query, SERVED_QUERY, _varied_request(i), timeout=60)
        if not response.success:
            failures.append((i, response.error))
    growth = proc.memory_info().rss - baseline
    print(f'\n[stress] 500 varied queries: {len(failures)} failed, RSS growth '
          f'{growth / 1e6:.1f} MB')
    assert not failures
    assert growth < 20 * 1024 * 1024


def _ready_clients(ros_client, service, count):
    """
    Return ``count`` clients whose replies are known to reach them.

    ``wait_for_service`` only says the server matched a client's requests; a reply sent
    before it has matched the client's response reader is lost (a discovery race of the
    test harness, not of the node). A request the node refuses at once (a NaN setting)
    proves the round trip; it is resent until answered.
    """
    clients = []
    probe = Query.Request(temperature=math.nan)
    for slot in range(1, count + 1):
        client = ros_client.client(Query, service, slot=slot)
        deadline = time.monotonic() + 30
        while True:
            future = client.call_async(probe)
            resend_at = time.monotonic() + 1.0
            while not future.done() and time.monotonic() < resend_at:
                time.sleep(0.01)
            if future.done():
                break
            client.remove_pending_request(future)
            assert time.monotonic() < deadline, f'{service}: no reply to client {slot}'
        clients.append(client)
    return clients


def test_concurrent_callers_are_each_answered_or_told_busy(node_process, ros_client, model_dir):
    node = node_process(*base_args(model_dir, '-p', 'queue_size:=2', '-p', 'feed_type:=1'))
    assert wait_active(ros_client)
    busy_ms = []
    for round_ in range(3):
        requests = [Query.Request(image=image_msg(frame(round_)), prompt=LONG_PROMPT)
                    for _ in range(16)]
        clients = _ready_clients(ros_client, '/vlm_node/query', 16)
        start = sent = time.monotonic()
        futures = [c.call_async(r) for c, r in zip(clients, requests, strict=True)]
        done_at = {}
        while len(done_at) < 16 and time.monotonic() - start < 120:
            for i, f in enumerate(futures):
                if i not in done_at and f.done():
                    done_at[i] = time.monotonic()
            time.sleep(0.002)
        if len(done_at) < 16:
            node.proc.send_signal(signal.SIGUSR1)  # the node's threads, into its log
            time.sleep(1.0)
        assert len(done_at) == 16, (f'round {round_}: {16 - len(done_at)} callers got no '
                                    f'reply; node log:\n{node.output()[-6000:]}')
        responses = [f.result() for f in futures]
        answered = [r for r in responses if r.success]
        busy = [i for i, r in enumerate(responses) if not r.success]
        assert all('busy' in responses[i].error for i in busy), [r.error for r in responses]
        assert 1 <= len(answered) <= 2 + 1 and len(busy) >= 13
        busy_ms += [(done_at[i] - sent) * 1000.0 for i in busy]
    print(f'\n[stress] busy replies: median {statistics.median(busy_ms):.0f} ms, '
          f'max {max(busy_ms):.0f} ms over {len(busy_ms)}')
    assert max(busy_ms) < 2000  # no DDS resend: every request was taken at once


def test_prompt_burst_is_answered_or_reported(node_process, ros_client, model_dir):
    node_process(*base_args(model_dir, '-p', 'queue_size:=2', '-p', 'feed_type:=1'))
    assert wait_active(ros_client)
    details = Collector(ros_client, ResultMsg, 'result_detail', depth=200)
    from rclpy.qos import qos_profile_sensor_data, QoSProfile
    image_pub = ros_client.node.create_publisher(Image, 'image', qos_profile_sensor_data)
    prompt_pub = ros_client.node.create_publisher(String, 'prompt', QoSProfile(depth=100))
    time.sleep(1.0)
    image_pub.publish(image_msg(frame(3)))
    time.sleep(0.3)
    for i in range(50):
        prompt_pub.publish(String(data=f'{PROMPT} #{i}'))
    assert details.wait(50, timeout=120), f'{len(details.messages)} of 50 prompts reported'
    prompts = sorted(m.prompt for m in details.messages)
    assert prompts == sorted(f'{PROMPT} #{i}' for i in range(50))
    dropped = [m for m in details.messages if m.text.startswith('prompt dropped: busy')]
    answered = [m for m in details.messages if m.finish_reason in ('stop', 'length')]
    assert len(dropped) + len(answered) == 50 and answered
    print(f'\n[stress] 50-prompt burst: {len(answered)} answered, {len(dropped)} dropped '
          '(reported)')


# -- fuzzing ---------------------------------------------------------------------------------

ENCODINGS = ['rgb8', 'bgr8', 'rgba8', 'bgra8', 'mono8', 'mono16', '16UC1', '8UC3', 'yuv422',
             '', '32FC1']


def _png(w, h, seed):
    ok, data = cv2.imencode('.png', np.random.default_rng(seed).integers(
        0, 256, (h, w, 3), dtype=np.uint8))
    return data.tobytes()


@st.composite
def raw_images(draw):
    h = draw(st.one_of(st.integers(0, 48), st.sampled_from([40000, 2**31 - 1])))
    w = draw(st.one_of(st.integers(0, 48), st.sampled_from([50000])))
    encoding = draw(st.sampled_from(ENCODINGS))
    step = draw(st.one_of(st.integers(0, 200), st.just(w * 3)))
    size = min(h * step, 20000) + draw(st.integers(-3, 3))
    data = draw(st.binary(min_size=max(0, min(size, 64)), max_size=64)) * (
        max(0, size) // 64 + 1)
    return Image(height=h, width=w, encoding=encoding, step=step,
                 is_bigendian=draw(st.integers(0, 1)), data=data[:max(0, size)])


@st.composite
def compressed_images(draw):
    kind = draw(st.sampled_from(['png', 'truncated', 'random', 'bomb', 'jpeg_as_png']))
    fmt = draw(st.sampled_from(['png', 'jpeg', 'bmp', 'webp', '', 'tiff', 'x;y']))
    if kind == 'png':
        data = _png(draw(st.integers(1, 40)), draw(st.integers(1, 40)), 0)
    elif kind == 'truncated':
        data = _png(30, 30, 1)[:draw(st.integers(1, 200))]
    elif kind == 'random':
        data = draw(st.binary(min_size=1, max_size=300))
    elif kind == 'bomb':
        from test_ros_messages import _png_header_only
        data = _png_header_only(draw(st.sampled_from([20000, 65535])), 20000)
    else:
        ok, jpg = cv2.imencode('.jpg', np.zeros((9, 9, 3), np.uint8))
        data = jpg.tobytes()
    return CompressedImage(format=fmt, data=data)


FLOATS = st.one_of(st.floats(width=32, allow_nan=True, allow_infinity=True),
                   st.sampled_from([-1.0, 0.0, 1.0, 1e9, 1e-30]))


@st.composite
def queries(draw):
    request = Query.Request(
        prompt=draw(st.one_of(st.text(max_size=300), st.just('a\x00b'),
                              st.just('😀' * 500 + '\u202e'), st.just('<image>' * 30))),
        max_new_tokens=draw(st.one_of(st.integers(-5, 8), st.sampled_from([2**31 - 1]))),
        temperature=draw(FLOATS), top_p=draw(FLOATS), repetition_penalty=draw(FLOATS),
        top_k=draw(st.integers(-3, 200000)), seed=draw(st.integers(-10, 2**31 - 1)))
    which = draw(st.sampled_from(['raw', 'compressed', 'none', 'good']))
    if which == 'raw':
        request.image = draw(raw_images())
    elif which == 'compressed':
        request.compressed_image = draw(compressed_images())
    elif which == 'good':
        request.image = image_msg(frame(draw(st.integers(0, 5)), 24, 16))
    return request


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(request=queries())
def test_fuzzed_requests_are_each_answered(served, request):
    node, client = served
    response = client.call(Query, SERVED_QUERY, request, timeout=60)
    assert response.success or response.error, 'a failure must say why'
    if not response.success:
        assert response.finish_reason in ('error', 'cancelled')
    if any(not math.isfinite(getattr(request, name))
           for name in ('temperature', 'top_p', 'repetition_penalty')):
        assert not response.success  # a non-finite setting is never used
    assert node.proc.poll() is None


def test_node_serves_after_fuzzing(served):
    node, client = served
    assert client.call(Query, SERVED_QUERY, Query.Request(image=image_msg(frame()),
                                                          prompt=PROMPT)).success
    assert node.proc.poll() is None


# -- shutdown ---------------------------------------------------------------------------------


class _Unreachable(Exception):
    """The test's client never reached a node that its log shows active (DDS discovery)."""


def _signal_trial(tmp_path, client, model_dir, signum, during_request, name):
    node = NodeProcess(tmp_path, '-r', f'__node:={name}',
                       *base_args(model_dir, '-p', 'max_new_tokens:=2000'), name=name)
    try:
        # Active by its own log, not by get_state: readiness must not depend on discovery.
        assert node.wait_for_output('sessions created', timeout=60), node.output()[-3000:]
        replies = []
        if during_request:
            service = f'/{name}/query'
            try:
                ready = _ready_clients(client, service, 2)  # one running, one queued
            except AssertionError as exc:
                node.proc.send_signal(signal.SIGUSR1)  # the node's threads, into its log
                time.sleep(1.0)
                raise _Unreachable(f'{exc}; node log:\n{node.output()[-4000:]}') from None
            calls = [c.call_async(Query.Request(image=image_msg(frame()), prompt=LONG_PROMPT))
                     for c in ready]
            time.sleep(0.5)
        start = time.monotonic()
        node.proc.send_signal(signum)
        code = node.proc.wait(10)
        elapsed = time.monotonic() - start
        if during_request:
            deadline = time.monotonic() + 5
            while not all(c.done() for c in calls) and time.monotonic() < deadline:
                time.sleep(0.01)
            replies = [c.result() for c in calls if c.done()]
            assert len(replies) == 2, 'a caller got no reply'
            for r in replies:
                assert r.success or 'cancelled' in r.error, r.error
        return code, elapsed
    finally:
        if node.proc.poll() is None:
            node.proc.kill()
        node.stop()


@pytest.mark.slow
@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM], ids=['SIGINT', 'SIGTERM'])
@pytest.mark.parametrize('during_request', [True, False], ids=['during_request', 'idle'])
def test_signals_exit_zero_and_answer_callers(tmp_path, model_dir, signum, during_request):
    from conftest import RosClient
    times, unreachable = [], []
    trial = 0
    while len(times) < 10:
        trial += 1
        # A client of its own per trial: clients kept for nodes that are gone would add
        # forty nodes' worth of stale discovery traffic over the run.
        client = RosClient(f'vlm_signal_client_{trial}')
        try:
            code, elapsed = _signal_trial(tmp_path, client, model_dir, signum, during_request,
                                          f'sig_{signum}_{int(during_request)}_{trial}')
        except _Unreachable as exc:
            # Before any signal: Fast DDS 2.14 (Jazzy's) sometimes never matches a fresh
            # client with a fresh node (seen about once in 80 trials, the node active and
            # idle). Not what this test is about, so that trial is run again, at most twice.
            unreachable.append(str(exc))
            assert len(unreachable) <= 2, '\n\n'.join(unreachable)
            continue
        finally:
            client.close()
        assert code == 0, f'trial {trial}: exit code {code}'
        assert elapsed < 5.0, f'trial {trial}: took {elapsed:.1f} s'
        times.append(elapsed)
    print(f'\n[stress] {signal.Signals(signum).name} '
          f'{"during a request" if during_request else "after activation"}: 10/10 exit 0, '
          f'max {max(times):.2f} s; {len(unreachable)} trial(s) run again (client never '
          'reached the node)')


# -- run-time parameter changes ---------------------------------------------------------------


def _set(client, name, value, node='/vlm_node'):
    kinds = {str: (ParameterType.PARAMETER_STRING, 'string_value'),
             int: (ParameterType.PARAMETER_INTEGER, 'integer_value')}
    kind, field = kinds[type(value)]
    param = Parameter(name=name, value=ParameterValue(type=kind, **{field: value}))
    return client.call(SetParameters, f'{node}/set_parameters',
                       SetParameters.Request(parameters=[param])).results[0]


def test_parameters_that_redirect_data_or_secrets_are_read_only(node_process, ros_client,
                                                                model_dir):
    node_process(*base_args(model_dir, '-p', 'autostart:=false'))
    assert get_state(ros_client) == 'unconfigured'
    for name, value in (('backend', 'remote'), ('remote_url', 'http://attacker:1/v1'),
                        ('remote_api_key_env', 'HOME'), ('model_dir', '/tmp'),
                        ('llm_model_name', 'x.gguf'), ('model_file_name', 'x.onnx'),
                        ('image', '/etc/passwd'), ('model_type', 0)):
        result = _set(ros_client, name, value)
        assert not result.successful, name
        assert 'read-only' in result.reason or 'read only' in result.reason.lower(), \
            result.reason
    assert _set(ros_client, 'max_new_tokens', 7).successful
