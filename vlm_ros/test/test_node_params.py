"""The installed vlm_node reads --ros-args parameters and serves them over parameter services."""

import subprocess

from conftest import installed_executable
from lifecycle_msgs.srv import GetState
import pytest
from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
from rcl_interfaces.srv import DescribeParameters, GetParameters, SetParameters

pytestmark = pytest.mark.ros


def get_params(ros_client, names, node='/vlm_node'):
    response = ros_client.call(GetParameters, f'{node}/get_parameters',
                               GetParameters.Request(names=names), resend_every=5.0)
    return response.values


def test_feed_type_from_command_line_is_visible(node_process, ros_client):
    node = node_process('-p', 'feed_type:=1', '-p', 'autostart:=false',
                        '-p', 'user_prompt:=Is the door open?')
    values = get_params(ros_client, ['feed_type', 'user_prompt', 'max_new_tokens'])
    assert values[0].type == ParameterType.PARAMETER_INTEGER and values[0].integer_value == 1
    assert values[1].string_value == 'Is the door open?'
    assert values[2].integer_value == 256
    assert node.proc.poll() is None


def test_descriptors_and_validation(node_process, ros_client):
    node_process('-p', 'autostart:=false')
    described = ros_client.call(DescribeParameters, '/vlm_node/describe_parameters',
                                DescribeParameters.Request(names=['top_p', 'queue_size']))
    top_p, queue_size = described.descriptors
    assert top_p.description and top_p.floating_point_range[0].to_value == 1.0
    assert queue_size.integer_range[0].from_value == 1

    def set_int(name, value):
        param = Parameter(name=name, value=ParameterValue(
            type=ParameterType.PARAMETER_INTEGER, integer_value=value))
        return ros_client.call(SetParameters, '/vlm_node/set_parameters',
                               SetParameters.Request(parameters=[param])).results[0]

    refused = set_int('feed_type', 5)
    assert not refused.successful and 'feed_type' in refused.reason
    assert set_int('feed_type', 1).successful
    assert get_params(ros_client, ['feed_type'])[0].integer_value == 1


def test_lifecycle_state_follows_autostart(node_process, ros_client):
    node_process('-r', '__node:=manual_vlm', '-p', 'autostart:=false')
    state = ros_client.call(GetState, '/manual_vlm/get_state', GetState.Request(),
                            resend_every=5.0)
    assert state.current_state.label == 'unconfigured'


def test_wrong_parameter_type_exits_with_a_clear_message():
    exe = installed_executable('vlm_ros', 'vlm_node')
    result = subprocess.run([str(exe), '--ros-args', '-p', 'feed_type:=camera'],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert 'feed_type must be an integer' in result.stderr
