"""
``~/detect`` and the detections topics, through the installed node on a tiny SmolVLM.

The tiny random model writes no boxes, so these tests check the plumbing against the
library on the same files (the questions asked, the answer text, the image's header, the
topics); box parsing and mapping are checked on recorded answers in test_grounding.py.
"""

import functools
import time

from conftest import tiny_model
from lifecycle_msgs.msg import Transition
import pytest
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image
from std_msgs.msg import String
from test_node import base_args, change_state, Collector, frame, image_msg, wait_active
import vlm_ros
from vlm_ros.engine import grounding
from vlm_ros.engine.datatypes import ImageOptions
from vlm_ros_interfaces.msg import Detection2DArray
from vlm_ros_interfaces.srv import Detect

pytestmark = pytest.mark.ros
DETECT = '/vlm_node/detect'
TOKENS = 12

cached_test_model = functools.partial(tiny_model, 'cached_test_model')


@pytest.fixture(scope='module')
def model_dir():
    return str(cached_test_model('a'))


@pytest.fixture(scope='module')
def pipe(model_dir):
    return vlm_ros.pipeline(model_dir, max_new_tokens=TOKENS, kv_cache_slots=0,
                            image_options=ImageOptions(do_image_splitting=False))


def detect(client, **fields):
    return client.call(Detect, DETECT, Detect.Request(**fields), timeout=120)


def test_detect_asks_the_family_question_per_label(node_process, ros_client, model_dir,
                                                   pipe):
    node_process(*base_args(model_dir))
    assert wait_active(ros_client)
    rgb = frame(3)
    msg = image_msg(rgb)
    msg.header.stamp.sec = 31
    response = detect(ros_client, image=msg, labels=['red circle', 'cup'])
    assert response.success, response.error
    questions = grounding.prompts(grounding.INTERNVL_PROMPT, ['red circle', 'cup'])
    expected = grounding.detect(pipe, rgb, questions)
    assert response.text == expected.text
    header = response.detections.header
    assert header.stamp.sec == 31 and header.frame_id == 'camera'
    assert [d.label for d in response.detections.detections] == \
        [b.label for b in expected.detections]
    for d in response.detections.detections:
        assert 0 <= d.center_x <= rgb.shape[1] and 0 <= d.center_y <= rgb.shape[0]

    # A free-form prompt is asked as it is.
    response = detect(ros_client, image=msg, prompt='Where is the cup?')
    assert response.success and response.text == pipe.generate(rgb, 'Where is the cup?').text


@pytest.mark.parametrize('fields, error', [
    ({}, 'labels (or a prompt) are required'),
    ({'labels': ['  ']}, 'labels (or a prompt) are required'),
    ({'labels': ['cup'], 'prompt': 'Where?'}, 'give labels or a prompt, not both'),
    ({'labels': ['cup']}, 'no camera frame has arrived'),  # no image, feed_type 0
])
def test_bad_detect_requests_get_precise_errors(node_process, ros_client, model_dir, fields,
                                                error):
    node = node_process(*base_args(model_dir))
    assert wait_active(ros_client)
    if 'labels' in fields and fields['labels'] == ['cup']:
        response = detect(ros_client, **fields)
    else:
        response = detect(ros_client, image=image_msg(frame()), **fields)
    assert not response.success and error in response.error, response.error
    assert response.detections.detections == []
    assert node.proc.poll() is None
    assert detect(ros_client, image=image_msg(frame()), labels=['cup']).success


def test_detect_while_inactive_and_custom_question(node_process, ros_client, model_dir, pipe):
    node_process(*base_args(model_dir, '-p', 'autostart:=false', '-p',
                            'detect_prompt:=Find every {labels} here.'))
    response = detect(ros_client, image=image_msg(frame()), labels=['cup'])
    assert not response.success and 'not active' in response.error
    assert change_state(ros_client, 'vlm_node', Transition.TRANSITION_CONFIGURE)
    assert change_state(ros_client, 'vlm_node', Transition.TRANSITION_ACTIVATE)
    rgb = frame(5)
    response = detect(ros_client, image=image_msg(rgb), labels=['cup', 'plate'])
    assert response.success
    assert response.text == pipe.generate(rgb, 'Find every cup, plate here.').text


def test_a_detect_prompt_without_labels_is_refused_at_configure(node_process, model_dir):
    node = node_process(*base_args(model_dir, '-p', 'detect_prompt:=Where is it?'))
    assert node.wait_for_output("a grounding question needs '{label}' or '{labels}'")


def test_feed_type_1_publishes_detections_and_draws_them_for_viewers(
        node_process, ros_client, model_dir):
    node_process(*base_args(model_dir, '-p', 'feed_type:=1'))
    assert wait_active(ros_client)
    detections = Collector(ros_client, Detection2DArray, 'detections')
    drawn = Collector(ros_client, Image, 'detections/image')
    image_pub = ros_client.node.create_publisher(Image, 'image', qos_profile_sensor_data)
    prompt_pub = ros_client.node.create_publisher(String, 'prompt', 10)
    time.sleep(1.0)  # discovery
    rgb = frame(8)
    msg = image_msg(rgb)
    msg.header.stamp.sec = 55
    image_pub.publish(msg)
    time.sleep(0.3)
    prompt_pub.publish(String(data='Where is the cup?'))
    assert detections.wait(1)
    assert detections.messages[0].header.stamp.sec == 55
    assert detections.messages[0].header.frame_id == 'camera'
    assert drawn.wait(1)
    picture = drawn.messages[0]
    assert (picture.width, picture.height, picture.encoding) == (96, 72, 'rgb8')
    assert picture.header.stamp.sec == 55
