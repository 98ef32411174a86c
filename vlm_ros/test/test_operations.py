"""
Operating the node: /diagnostics, the remote fallback, GPU options on a CPU machine.

A real subscriber reads ``diagnostic_msgs/DiagnosticArray`` from the installed node; the
remote server is the project's own ``vlm_serve`` on the tiny model, stopped mid-run.
"""

import shutil
import time

from conftest import free_port, ServeProcess, tiny_model
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from lifecycle_msgs.msg import Transition
import pytest
from test_node import base_args, change_state, frame, get_state, image_msg, query, wait_active
import vlm_ros
from vlm_ros.engine.datatypes import ImageOptions

pytestmark = pytest.mark.ros
PROMPT = 'What is in the picture?'


class Diagnostics:
    """Keeps the newest vlm_node status from /diagnostics."""

    def __init__(self, ros_client, name='/vlm_node'):
        self.name = name
        self.latest = None
        ros_client.node.create_subscription(DiagnosticArray, '/diagnostics', self._on_msg, 10)

    def _on_msg(self, msg):
        for status in msg.status:
            if status.name.startswith(self.name + ':'):
                self.latest = status

    def wait_for(self, predicate, timeout=20.0):
        """Return the first status (values as a dict) that satisfies ``predicate``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.latest
            if status is not None:
                values = {kv.key: kv.value for kv in status.values}
                if predicate(status, values):
                    return status, values
            time.sleep(0.05)
        raise AssertionError(f'no matching status within {timeout} s; last: {self.latest}')


@pytest.fixture(scope='module')
def model_dir():
    return str(tiny_model('cached_test_model', 'a'))


def test_diagnostics_follow_states_and_requests(node_process, ros_client, model_dir):
    node_process(*base_args(model_dir, '-p', 'autostart:=false', '-p', 'feed_type:=1',
                            '-p', 'diagnostics_failures_warn:=2'))
    diag = Diagnostics(ros_client)
    status, values = diag.wait_for(lambda s, v: v['lifecycle_state'] == 'unconfigured')
    assert status.level == DiagnosticStatus.OK and values['model'] == '-'
    assert float(values['rss_mb']) > 10
    assert change_state(ros_client, 'vlm_node', Transition.TRANSITION_CONFIGURE)
    assert change_state(ros_client, 'vlm_node', Transition.TRANSITION_ACTIVATE)
    status, values = diag.wait_for(lambda s, v: v['lifecycle_state'] == 'active')
    assert 'smolvlm' in values['model'] and 'onnxruntime' in values['model']
    assert query(ros_client, image=image_msg(frame()), prompt=PROMPT).success
    status, values = diag.wait_for(lambda s, v: v['requests_answered'] == '1')
    assert values['last_ttft_ms'] != '-' and values['last_backend'] == 'local'
    assert status.level == DiagnosticStatus.OK
    # Two failures in a row (an unknown encoding) turn the status to WARN.
    bad = image_msg(frame())
    bad.encoding = 'yuv422'
    for _ in range(2):
        assert not query(ros_client, image=bad, prompt=PROMPT).success
    status, values = diag.wait_for(lambda s, v: v['requests_failed'] == '2')
    assert status.level == DiagnosticStatus.WARN and 'in a row failed' in status.message
    assert query(ros_client, image=image_msg(frame()), prompt=PROMPT).success
    status, _ = diag.wait_for(lambda s, v: v['requests_answered'] == '2')
    assert status.level == DiagnosticStatus.OK
    assert change_state(ros_client, 'vlm_node', Transition.TRANSITION_DEACTIVATE)
    diag.wait_for(lambda s, v: v['lifecycle_state'] == 'inactive')
    assert not query(ros_client, image=image_msg(frame()), prompt=PROMPT).success
    diag.wait_for(lambda s, v: v['requests_refused'] == '1')


def test_failed_activation_is_an_error(node_process, ros_client, model_dir, tmp_path):
    broken = tmp_path / 'broken'
    shutil.copytree(model_dir, broken)
    (broken / 'onnx' / 'vision_encoder.onnx').write_bytes(b'\x00' * 64)
    node_process('-p', f'model_dir:={broken}', '-p', 'autostart:=false')
    diag = Diagnostics(ros_client)
    assert change_state(ros_client, 'vlm_node', Transition.TRANSITION_CONFIGURE)
    assert not change_state(ros_client, 'vlm_node', Transition.TRANSITION_ACTIVATE)
    assert get_state(ros_client) == 'inactive'
    status, _ = diag.wait_for(lambda s, v: s.level == DiagnosticStatus.ERROR)
    assert 'activation failed' in status.message and 'vision_encoder.onnx' in status.message


def test_unreachable_server_is_a_warning(node_process, ros_client):
    url = f'http://127.0.0.1:{free_port()}/v1'  # nothing listens there
    node_process('-p', 'backend:=remote', '-p', f'remote_url:={url}', '-p', 'remote_model:=tiny',
                 '-p', 'remote_max_retries:=0', '-p', 'feed_type:=1')
    assert wait_active(ros_client)
    diag = Diagnostics(ros_client)
    response = query(ros_client, image=image_msg(frame()), prompt=PROMPT)
    assert not response.success and 'cannot reach' in response.error
    status, _ = diag.wait_for(lambda s, v: s.level == DiagnosticStatus.WARN)
    assert 'remote server unreachable' in status.message


def test_remote_fallback_answers_locally_when_the_server_goes(node_process, ros_client,
                                                              model_dir, tmp_path):
    server = ServeProcess(tmp_path, model_dir, '--served-model-name', 'tiny',
                          '--no-split').wait_ready()
    try:
        node_process('-p', 'backend:=remote', '-p', f'remote_url:={server.url}',
                     '-p', 'remote_model:=tiny', '-p', 'remote_max_retries:=0',
                     '-p', 'remote_fallback:=local', '-p', f'model_dir:={model_dir}',
                     '-p', 'feed_type:=1', '-p', 'max_new_tokens:=8')
        assert wait_active(ros_client)
        diag = Diagnostics(ros_client)
        rgb = frame(3)
        remote = query(ros_client, image=image_msg(rgb), prompt=PROMPT)
        assert remote.success, remote.error
        status, values = diag.wait_for(lambda s, v: v['requests_answered'] == '1')
        assert values['last_backend'] == 'remote' and status.level == DiagnosticStatus.OK
    finally:
        server.stop()
    local = query(ros_client, image=image_msg(rgb), prompt=PROMPT)
    assert local.success, local.error
    expected = vlm_ros.pipeline(model_dir, max_new_tokens=8, kv_cache_slots=0,
                                image_options=ImageOptions(do_image_splitting=False))
    assert local.text == expected.generate(rgb, PROMPT).text
    status, values = diag.wait_for(lambda s, v: v['requests_answered'] == '2')
    assert values['last_backend'] == 'local (fallback)'
    assert status.level == DiagnosticStatus.WARN and 'local model answers' in status.message


def test_gpu_options_on_a_cpu_machine(node_process, ros_client, model_dir):
    """Skip unavailable ONNX providers with a warning; a CPU llama.cpp takes n_gpu_layers."""
    gguf = tiny_model('cached_gguf', 'a', 'f32')
    node = node_process(*base_args(
        model_dir, '-p', f'llm_model_name:={gguf}', '-p', 'n_gpu_layers:=-1', '-p',
        'onnx_providers:=[CUDAExecutionProvider, CPUExecutionProvider]', '-p', 'feed_type:=1'))
    assert wait_active(ros_client)
    assert query(ros_client, image=image_msg(frame()), prompt=PROMPT).success
    assert node.wait_for_output("['CUDAExecutionProvider'] are not available")
