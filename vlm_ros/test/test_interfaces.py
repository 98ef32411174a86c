"""The built Query type crosses DDS between two real processes intact."""

import json
import subprocess

from conftest import python_script, TEST_DIR
import numpy as np
import pytest
from sensor_msgs.msg import Image
from vlm_ros_interfaces.msg import Result
from vlm_ros_interfaces.srv import Query

pytestmark = pytest.mark.ros


@pytest.fixture
def echo_server():
    proc = subprocess.Popen(python_script(TEST_DIR / 'query_echo_server.py'),
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == 'echo server ready'
    yield proc
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:  # a loaded machine; the test's checks are done
        proc.kill()
        proc.wait()


def test_request_defaults_mean_use_the_node_parameter():
    request = Query.Request()
    assert (request.max_new_tokens, request.temperature, request.top_p, request.top_k,
            request.seed, request.repetition_penalty) == (0, -1.0, 0.0, 0, -1, 0.0)
    assert request.prompt == '' and request.system_prompt == ''
    assert len(request.image.data) == 0 and len(request.compressed_image.data) == 0
    assert {Query.Response.FINISH_STOP, Query.Response.FINISH_LENGTH,
            Query.Response.FINISH_CANCELLED, Query.Response.FINISH_ERROR} == {
                'stop', 'length', 'cancelled', 'error'}


def test_defaults_round_trip(echo_server, ros_client):
    response = ros_client.call(Query, 'echo_query', Query.Request())
    seen = json.loads(response.text)
    assert seen['max_new_tokens'] == 0 and seen['temperature'] == -1.0
    assert seen['top_p'] == 0.0 and seen['top_k'] == 0 and seen['seed'] == -1
    assert seen['image'][:2] == [0, 0] and seen['compressed'][1] == 0


def test_full_request_and_response_round_trip(echo_server, ros_client):
    pixels = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    request = Query.Request(prompt='What colour is the cup?', system_prompt='Be brief.',
                            max_new_tokens=17, temperature=0.7, top_p=0.9, top_k=40, seed=7,
                            repetition_penalty=1.1)
    request.image = Image(height=48, width=64, encoding='rgb8', step=64 * 3,
                          data=pixels.tobytes())
    request.image.header.frame_id = 'camera_optical'
    request.compressed_image.format = 'jpeg'
    request.compressed_image.data = b'\xff\xd8\xff\xe0' * 10
    response = ros_client.call(Query, 'echo_query', request)
    seen = json.loads(response.text)
    assert seen['prompt'] == 'What colour is the cup?' and seen['system_prompt'] == 'Be brief.'
    assert (seen['max_new_tokens'], seen['top_k'], seen['seed']) == (17, 40, 7)
    assert seen['temperature'] == pytest.approx(0.7) and seen['top_p'] == pytest.approx(0.9)
    assert seen['repetition_penalty'] == pytest.approx(1.1)
    assert seen['image'] == [48, 64, 'rgb8', 192, 48 * 64 * 3, 'camera_optical']
    assert seen['checksum'] == int(pixels.astype(np.int64).sum()) % 65521
    assert seen['compressed'] == ['jpeg', 40]
    assert response.success and response.error == ''
    assert response.finish_reason == 'length'
    assert (response.prompt_tokens, response.completion_tokens) == (123, 45)
    assert (response.preprocess_ms, response.vision_ms, response.prefill_ms,
            response.decode_ms, response.total_ms) == (0.5, 1.25, 2.5, 5.0, 9.25)


def test_result_message_fields():
    msg = Result(prompt='p', text='t', finish_reason='stop', prompt_tokens=3,
                 completion_tokens=2, total_ms=1.5)
    msg.header.frame_id = 'cam'
    assert (msg.header.frame_id, msg.prompt, msg.text, msg.total_ms) == ('cam', 'p', 't', 1.5)
