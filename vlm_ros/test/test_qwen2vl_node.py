"""
The installed vlm_node on tiny Qwen2-VL and Qwen2.5-VL checkpoints (``model_type`` 2).

The node loads the family from its parameters alone (the model folder, an mmproj or our
ONNX vision encoder, a ``qwen2vl`` GGUF) and answers ``~/query``, ``~/detect`` and the
``~/generate`` action with two images exactly as the library does on the same files: the
M-RoPE positions, the checkpoint's own grounding question (Qwen2-VL: one per label;
Qwen2.5-VL: one for all labels) and Qwen2-VL's box markers kept in the text.
"""

from action_msgs.msg import GoalStatus
from conftest import tiny_model
import pytest
from test_generate_action import action_client, Goal
from test_node import base_args, frame, image_msg, query, wait_active
import vlm_ros
from vlm_ros.engine import grounding
from vlm_ros_interfaces.action import Generate
from vlm_ros_interfaces.srv import Detect

pytestmark = pytest.mark.ros
PROMPT = 'What is in the picture?'
TOKENS = 12
# One checkpoint of each family; the vision side through libmtmd and through our ONNX graph.
CASES = [('qwen2-a', 'mtmd'), ('qwen25-a', 'mtmd'), ('qwen25-b', 'onnx')]


@pytest.fixture(scope='module', params=CASES, ids=['-'.join(c) for c in CASES])
def qwen(request):
    """(ros args for the node, the library pipeline on the same files)."""
    variant, vision = request.param
    model_dir = str(tiny_model('cached_qwen2vl_onnx_model', variant))
    vision_file = (str(tiny_model('cached_qwen2vl_mmproj', variant, 'f32')) if vision == 'mtmd'
                   else 'onnx/vision_encoder.onnx')
    decoder = str(tiny_model('cached_qwen2vl_gguf', variant, 'f32'))
    args = base_args(model_dir, '-p', 'model_type:=2', '-p', f'model_file_name:={vision_file}',
                     '-p', f'llm_model_name:={decoder}')
    pipe = vlm_ros.pipeline(model_dir, vision_model=vision_file, decoder_model=decoder,
                            max_new_tokens=TOKENS, kv_cache_slots=0)
    yield args, pipe
    pipe.close()


def test_query_and_detect_answer_as_the_library(qwen, node_process, ros_client):
    args, pipe = qwen
    node_process(*args)
    assert wait_active(ros_client)
    rgb = frame(1, 120, 90)
    response = query(ros_client, image=image_msg(rgb), prompt=PROMPT)
    expected = pipe.generate(rgb, PROMPT)
    assert response.success, response.error
    assert response.text == expected.text
    assert response.prompt_tokens == expected.prompt_tokens

    labels = ['cup', 'red ball']
    response = ros_client.call(Detect, '/vlm_node/detect',
                               Detect.Request(image=image_msg(rgb), labels=labels), timeout=120)
    assert response.success, response.error
    questions = grounding.prompts(pipe.family.info.grounding_prompt, labels)
    # Qwen2-VL was trained on one object per question, Qwen2.5-VL (VLM-R1) on all at once.
    assert len(questions) == (1 if pipe.family.info.box_format == grounding.ABSOLUTE else 2)
    expected = grounding.detect(pipe, rgb, questions)
    assert response.text == expected.text
    assert len(response.detections.detections) == len(expected.detections)


def test_two_images_through_the_action(qwen, node_process, ros_client):
    args, pipe = qwen
    node_process(*args, '-p', 'feed_type:=1')
    assert wait_active(ros_client)
    caller = action_client(ros_client)
    first, second = frame(2, 84, 56), frame(3, 56, 112)
    goal = Goal(caller, Generate.Goal(images=[image_msg(first), image_msg(second)],
                                      prompt=PROMPT, history=['Hello.', 'Hi.']))
    status, result = goal.result()
    assert status == GoalStatus.STATUS_SUCCEEDED and result.success, result.error
    expected = pipe.generate([first, second], PROMPT, history=['Hello.', 'Hi.'])
    assert result.text == expected.text and result.prompt_tokens == expected.prompt_tokens
    assert goal.text() == result.text
