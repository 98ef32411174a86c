"""
The vlm_node process on a tiny SmolVLM: lifecycle, feed types, Query service, bad input.

Every test starts the installed executable with --ros-args, drives it through the standard
lifecycle_msgs services and talks to it from a real rclpy client; expected answers come from
the pipeline API on the same model files.
"""

import functools
import json
import pathlib
import subprocess
import threading
import time

from conftest import installed_executable, python_script, TEST_DIR, tiny_model
import cv2
from lifecycle_msgs.msg import Transition
from lifecycle_msgs.srv import ChangeState, GetState
import numpy as np
import psutil
import pytest
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String
import vlm_ros
from vlm_ros.engine.datatypes import ImageOptions
from vlm_ros_interfaces.msg import Result as ResultMsg
from vlm_ros_interfaces.srv import Query


pytestmark = pytest.mark.ros
PROMPT = 'What is in the picture?'
TOKENS = 12


cached_test_model = functools.partial(tiny_model, 'cached_test_model')
cached_gguf = functools.partial(tiny_model, 'cached_gguf')
cached_mmproj = functools.partial(tiny_model, 'cached_mmproj')


@pytest.fixture(scope='module')
def model_dir():
    return str(cached_test_model('a'))


@pytest.fixture(scope='module')
def pipe(model_dir):
    # The node splits no images unless asked (do_image_splitting defaults to false).
    return vlm_ros.pipeline(model_dir, max_new_tokens=TOKENS, kv_cache_slots=0,
                            image_options=ImageOptions(do_image_splitting=False))


def frame(seed=0, width=96, height=72):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def image_msg(rgb, encoding='rgb8', pad=0):
    h, w = rgb.shape[:2]
    pixels = rgb if encoding == 'rgb8' else rgb[..., ::-1]
    rows = np.zeros((h, w * 3 + pad), np.uint8)
    rows[:, :w * 3] = pixels.reshape(h, -1)
    msg = Image(height=h, width=w, encoding=encoding, step=w * 3 + pad, data=rows.tobytes())
    msg.header.frame_id = 'camera'
    return msg


def base_args(model_dir, *extra):
    # No prefix reuse (kv_cache_slots 0) where answers are compared with a library pipeline:
    # a kept prefix is exact to float rounding, not bit for bit, and the tiny random models
    # have near-tied tokens that rounding can flip (test_caches checks reuse on its own).
    return ['-p', f'model_dir:={model_dir}', '-p', f'max_new_tokens:={TOKENS}',
            '-p', 'kv_cache_slots:=0', *extra]


def change_state(client, node, transition):
    response = client.call(ChangeState, f'/{node}/change_state',
                           ChangeState.Request(transition=Transition(id=transition)))
    return response.success


def get_state(client, node='vlm_node'):
    response = client.call(GetState, f'/{node}/get_state', GetState.Request(), resend_every=5.0)
    return response.current_state.label


def wait_active(client, node='vlm_node', timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if get_state(client, node) == 'active':
            return True
        time.sleep(0.1)
    return False


def query(client, **fields):
    return client.call(Query, '/vlm_node/query', Query.Request(**fields), timeout=120)


class Collector:
    """Subscribes to a topic and keeps what arrives."""

    def __init__(self, client, msg_type, topic, depth=10):
        self.messages = []
        self._event = threading.Condition()
        client.node.create_subscription(msg_type, topic, self._on_msg, depth)

    def _on_msg(self, msg):
        with self._event:
            self.messages.append(msg)
            self._event.notify_all()

    def wait(self, count=1, timeout=60):
        with self._event:
            self._event.wait_for(lambda: len(self.messages) >= count, timeout)
        return len(self.messages) >= count


def test_lifecycle_transitions_and_sessions(node_process, ros_client, model_dir):
    node = node_process(*base_args(model_dir, '-p', 'autostart:=false'))
    assert get_state(ros_client) == 'unconfigured'
    response = query(ros_client, image=image_msg(frame()))
    assert not response.success and 'not active' in response.error
    assert change_state(ros_client, 'vlm_node', Transition.TRANSITION_CONFIGURE)
    assert get_state(ros_client) == 'inactive'
    assert 'sessions created' not in node.output()
    assert change_state(ros_client, 'vlm_node', Transition.TRANSITION_ACTIVATE)
    assert node.wait_for_output('sessions created')
    assert query(ros_client, image=image_msg(frame())).success
    assert change_state(ros_client, 'vlm_node', Transition.TRANSITION_DEACTIVATE)
    assert node.wait_for_output('sessions released')
    response = query(ros_client, image=image_msg(frame()))
    assert not response.success and 'not active' in response.error
    assert change_state(ros_client, 'vlm_node', Transition.TRANSITION_CLEANUP)
    assert get_state(ros_client) == 'unconfigured'
    assert change_state(ros_client, 'vlm_node',
                        Transition.TRANSITION_UNCONFIGURED_SHUTDOWN)
    assert get_state(ros_client) == 'finalized'
    assert node.stop() == 0


def test_failing_configure_names_the_file(node_process, ros_client, tmp_path):
    node = node_process('-p', f'model_dir:={tmp_path}', '-p', 'autostart:=false')
    assert not change_state(ros_client, 'vlm_node', Transition.TRANSITION_CONFIGURE)
    assert get_state(ros_client) == 'unconfigured'
    assert node.wait_for_output(f'configure failed: config.json not found in {tmp_path}')
    mismatched = node_process('-r', '__node:=wrong_type', '-p', 'autostart:=false',
                              '-p', 'model_type:=0', '-p',
                              f'model_dir:={cached_test_model("a")}')
    assert not change_state(ros_client, 'wrong_type', Transition.TRANSITION_CONFIGURE)
    assert mismatched.wait_for_output("describes a 'smolvlm' model")


def test_activate_deactivate_cycles_do_not_leak(node_process, ros_client, model_dir):
    node = node_process(*base_args(model_dir, '-p', 'autostart:=false'))
    assert change_state(ros_client, 'vlm_node', Transition.TRANSITION_CONFIGURE)
    proc = psutil.Process(node.proc.pid)

    def cycle():
        assert change_state(ros_client, 'vlm_node', Transition.TRANSITION_ACTIVATE)
        assert query(ros_client, image=image_msg(frame())).success
        assert change_state(ros_client, 'vlm_node', Transition.TRANSITION_DEACTIVATE)

    for _ in range(3):
        cycle()
    baseline = proc.memory_info().rss
    for _ in range(20):
        cycle()
    growth = proc.memory_info().rss - baseline
    assert growth < 20 * 1024 * 1024, f'RSS grew {growth / 1e6:.1f} MB over 20 cycles'


def test_feed_type_0_one_shot_prints_the_pipeline_answer(tmp_path, model_dir, pipe):
    from PIL import Image as PilImage
    path = tmp_path / 'frame.png'
    PilImage.fromarray(frame(3)).save(path)
    expected = pipe.generate(str(path), 'Describe this image.').text
    exe = installed_executable('vlm_ros', 'vlm_node')
    run = subprocess.run([str(exe), '--ros-args', *base_args(
        model_dir, '-p', 'feed_type:=0', '-p', 'one_shot:=true', '-p', f'image:={path}')],
        capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == expected.strip()
    assert f'frame.png: {expected}' in run.stderr


def test_feed_type_0_folder_answers_each_file_in_order(tmp_path, model_dir, pipe):
    from PIL import Image as PilImage
    names = ['b.png', 'a.jpg', 'c.png']
    for i, name in enumerate(names):
        PilImage.fromarray(frame(10 + i)).save(tmp_path / name)
    (tmp_path / 'notes.txt').write_text('not an image')
    exe = installed_executable('vlm_ros', 'vlm_node')
    run = subprocess.run([str(exe), '--ros-args', *base_args(
        model_dir, '-p', 'feed_type:=0', '-p', 'one_shot:=true', '-p', 'image_type:=1',
        '-p', f'image:={tmp_path}', '-p', f'user_prompt:={PROMPT}')],
        capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    answers = run.stdout.strip().split('\n')
    assert len(answers) == 3
    for name, answer in zip(sorted(names), answers, strict=True):
        assert answer == pipe.generate(str(tmp_path / name), PROMPT).text.strip()
        assert f'{name}: ' in run.stderr


def test_feed_type_0_missing_image_fails_clearly(tmp_path, model_dir):
    exe = installed_executable('vlm_ros', 'vlm_node')
    run = subprocess.run([str(exe), '--ros-args', *base_args(
        model_dir, '-p', 'feed_type:=0', '-p', 'one_shot:=true',
        '-p', f'image:={tmp_path}/nope.png')], capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    assert 'image file not found' in run.stderr


def test_feed_type_1_answers_on_the_latest_frame(node_process, ros_client, model_dir, pipe):
    node = node_process(*base_args(model_dir, '-p', 'feed_type:=1'))
    assert wait_active(ros_client)
    results = Collector(ros_client, String, 'result')
    details = Collector(ros_client, ResultMsg, 'result_detail')
    image_pub = ros_client.node.create_publisher(
        Image, 'image', __import__('rclpy').qos.qos_profile_sensor_data)
    prompt_pub = ros_client.node.create_publisher(String, 'prompt', 10)
    time.sleep(1.0)  # discovery
    rgb = frame(21)
    msg = image_msg(rgb, 'bgr8', pad=5)
    msg.header.stamp.sec = 42
    image_pub.publish(msg)
    time.sleep(0.3)
    prompt_pub.publish(String(data=PROMPT))
    assert results.wait(1)
    assert results.messages[0].data == pipe.generate(rgb, PROMPT).text
    assert details.wait(1)
    detail = details.messages[0]
    assert detail.header.stamp.sec == 42 and detail.header.frame_id == 'camera'
    assert detail.prompt == PROMPT and detail.completion_tokens > 0 and detail.total_ms > 0

    # A burst of 100 frames queues no work and grows no memory: the next prompt is answered
    # once, on the newest frame (its stamp comes back), and frames alone publish nothing.
    proc = psutil.Process(node.proc.pid)
    for i in range(100):
        image_pub.publish(image_msg(frame(100 + i)))
    time.sleep(0.3)  # best-effort camera QoS: the newest frame must not be dropped in the burst
    last = frame(500)
    last_msg = image_msg(last)
    last_msg.header.stamp.sec = 77
    for _ in range(3):  # best effort: the newest frame is resent, as a camera would send more
        image_pub.publish(last_msg)
        time.sleep(0.2)
    rss_after_burst = proc.memory_info().rss
    prompt_pub.publish(String(data=PROMPT))
    assert results.wait(2) and details.wait(2)
    assert results.messages[1].data == pipe.generate(last, PROMPT).text
    assert details.messages[1].header.stamp.sec == 77
    for i in range(100):
        image_pub.publish(image_msg(frame(700 + i)))
    time.sleep(0.5)
    growth = proc.memory_info().rss - rss_after_burst
    assert growth < 10 * 1024 * 1024, f'RSS grew {growth / 1e6:.1f} MB over 100 frames'
    assert len(results.messages) == 2 and len(details.messages) == 2


def test_compressed_frames_are_used(node_process, ros_client, model_dir, pipe):
    node_process(*base_args(model_dir, '-p', 'feed_type:=1'))
    assert wait_active(ros_client)
    results = Collector(ros_client, String, 'result')
    pub = ros_client.node.create_publisher(
        CompressedImage, 'image/compressed', __import__('rclpy').qos.qos_profile_sensor_data)
    prompt_pub = ros_client.node.create_publisher(String, 'prompt', 10)
    time.sleep(1.0)
    rgb = frame(7)
    ok, png = cv2.imencode('.png', rgb[..., ::-1])
    pub.publish(CompressedImage(format='png', data=png.tobytes()))
    time.sleep(0.3)
    prompt_pub.publish(String(data=PROMPT))
    assert results.wait(1)
    assert results.messages[0].data == pipe.generate(rgb, PROMPT).text


def test_query_answer_equals_pipeline_with_overrides(node_process, ros_client, model_dir,
                                                     pipe):
    node_process(*base_args(model_dir))
    assert wait_active(ros_client)
    rgb = frame(5)
    response = query(ros_client, image=image_msg(rgb), prompt=PROMPT)
    expected = pipe.generate(rgb, PROMPT)
    assert response.success and response.error == ''
    assert response.text == expected.text
    assert response.finish_reason == expected.finish_reason
    assert response.prompt_tokens == expected.prompt_tokens
    assert response.completion_tokens == expected.completion_tokens
    assert response.vision_ms > 0 and response.prefill_ms > 0 and response.total_ms > 0
    short = query(ros_client, image=image_msg(rgb), prompt=PROMPT, max_new_tokens=3)
    assert short.completion_tokens <= 3
    sampled = [query(ros_client, image=image_msg(rgb), prompt=PROMPT, temperature=1.5,
                     seed=9).text for _ in range(2)]
    assert sampled[0] == sampled[1] == pipe.generate(rgb, PROMPT, temperature=1.5,
                                                     seed=9).text
    ok, jpeg = cv2.imencode('.jpg', rgb[..., ::-1])
    compressed = query(ros_client, prompt=PROMPT,
                       compressed_image=CompressedImage(format='jpeg', data=jpeg.tobytes()))
    # The node decodes as the library decodes encoded bytes (one image policy).
    assert compressed.success and compressed.text == pipe.generate(jpeg.tobytes(), PROMPT).text
    no_image = query(ros_client, prompt=PROMPT)
    assert not no_image.success and 'no image' in no_image.error


def test_follow_up_queries_reuse_features_and_prefix(node_process, ros_client, model_dir,
                                                     pipe):
    node_process(*base_args(model_dir, '-p', 'feed_type:=1', '-p', 'kv_cache_slots:=2'))
    assert wait_active(ros_client)
    rgb = frame(6)
    first = query(ros_client, image=image_msg(rgb), prompt=PROMPT)
    again = query(ros_client, image=image_msg(rgb), prompt='What colour is it?')
    assert first.success and again.success
    assert first.cached_tokens == 0 and first.vision_ms > 0
    assert again.vision_ms == 0.0 and again.prompt_tokens - again.cached_tokens < 20
    assert again.text == pipe.generate(rgb, 'What colour is it?').text
    other = query(ros_client, image=image_msg(frame(7)), prompt='What colour is it?')
    assert other.vision_ms > 0 and other.cached_tokens < again.cached_tokens


def test_concurrent_callers_beyond_the_queue_are_told_busy(node_process, ros_client,
                                                           model_dir):
    # A 6000-token prompt keeps the decoder in prefill for about two seconds, so all eight
    # calls arrive while the first is running, however the machine schedules the threads.
    node_process(*base_args(model_dir, '-p', 'feed_type:=1', '-p', 'queue_size:=4'))
    assert wait_active(ros_client)
    long_prompt = 'look ' * 2000
    responses = ros_client.call_together(
        Query, '/vlm_node/query',
        [Query.Request(image=image_msg(frame(1)), prompt=long_prompt) for _ in range(8)])
    assert len(responses) == 8
    busy = [r for r in responses if not r.success]
    assert len(busy) >= 4 and all('busy' in r.error for r in busy)
    assert sum(r.success for r in responses) >= 1
    assert query(ros_client, image=image_msg(frame()), prompt=PROMPT).success


BAD_IMAGES = {
    'length': (lambda: Image(height=10, width=10, encoding='rgb8', step=30,
                             data=bytes(299)), 'expected height*step'),
    'encoding': (lambda: Image(height=2, width=2, encoding='yuv422', step=4,
                               data=bytes(8)), 'unsupported image encoding'),
    'zero': (lambda: Image(height=0, width=4, encoding='rgb8', step=12, data=bytes(1)),
             'is empty'),
    'absurd': (lambda: Image(height=1, width=100000, encoding='mono8', step=100000,
                             data=bytes(100000)), 'a side over'),
    'step': (lambda: Image(height=2, width=4, encoding='rgb8', step=6, data=bytes(12)),
             'shorter than'),
}


def test_malformed_images_get_specific_errors(node_process, ros_client, model_dir):
    node = node_process(*base_args(model_dir))
    assert wait_active(ros_client)
    for name, (make, expected) in BAD_IMAGES.items():
        response = query(ros_client, image=make(), prompt=PROMPT)
        assert not response.success and expected in response.error, (name, response.error)
        assert response.finish_reason == 'error'
        assert query(ros_client, image=image_msg(frame()), prompt=PROMPT).success
    corrupt = query(ros_client, prompt=PROMPT, compressed_image=CompressedImage(
        format='jpeg', data=b'\xff\xd8\xff\xe0' + bytes(100)))
    assert not corrupt.success and 'not an image' in corrupt.error
    assert node.proc.poll() is None


def test_sigterm_shuts_down_cleanly(node_process, ros_client, model_dir):
    node = node_process(*base_args(model_dir))
    assert wait_active(ros_client)
    node.proc.terminate()
    assert node.proc.wait(20) == 0


def test_launch_file_and_configs(tmp_path):
    import ast
    from vlm_ros.ros import params
    package = pathlib.Path(__file__).resolve().parents[1]
    launch = (package / 'launch' / 'vlm_node.launch.py').read_text()
    tree = ast.parse(launch)
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert modules <= {'launch', 'launch.actions', 'launch.substitutions',
                       'launch_ros.actions', 'launch_ros.substitutions'}
    assert "executable='vlm_node'" in launch and "package='vlm_ros'" in launch
    configs = sorted((package / 'config').glob('*.yaml'))
    assert len(configs) >= 6
    for path in configs:
        # Its own process: the real rcl --params-file parser, then the node's validation.
        run = subprocess.run(python_script(TEST_DIR / 'check_params_file.py', path),
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, (path.name, run.stderr)
        names = set(json.loads(run.stdout))
        assert names <= set(params.SPEC_BY_NAME), (path.name, names)
        assert 'model_type' in names or 'backend' in names or path.name == 'default.yaml'
    bad = tmp_path / 'bad.yaml'
    bad.write_text('/**:\n  ros__parameters:\n    feed_type: 5\n')
    run = subprocess.run(python_script(TEST_DIR / 'check_params_file.py', bad),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and 'feed_type must be one of' in run.stderr


@pytest.mark.parametrize('runtime', ['llama.cpp', 'mtmd'])
def test_query_served_by_llamacpp(node_process, ros_client, model_dir, runtime):
    pytest.importorskip('llama_cpp')
    gguf = cached_gguf('a', 'f32')
    if runtime == 'mtmd':
        # The GGUFs alone, as llama.cpp's multimodal releases ship them: no model_dir.
        args = ['-p', f'model_file_name:={cached_mmproj("a")}', '-p', f'llm_model_name:={gguf}']
        expected_pipe = vlm_ros.pipeline(None, vision_model=cached_mmproj('a'), kv_cache_slots=0,
                                         decoder_model=gguf, max_new_tokens=TOKENS)
    else:
        args = ['-p', f'model_dir:={model_dir}', '-p', f'llm_model_name:={gguf}']
        expected_pipe = vlm_ros.pipeline(model_dir, decoder_model=gguf, max_new_tokens=TOKENS,
                                         kv_cache_slots=0,
                                         image_options=ImageOptions(do_image_splitting=False))
    node = node_process('-p', f'max_new_tokens:={TOKENS}', '-p', 'feed_type:=1', *args)
    assert wait_active(ros_client)
    assert node.wait_for_output('llama.cpp')
    rgb = frame(8)
    response = query(ros_client, image=image_msg(rgb), prompt=PROMPT)
    expected = expected_pipe.generate(rgb, PROMPT)
    assert response.success, response.error
    assert response.text == expected.text and response.prompt_tokens == expected.prompt_tokens
