"""
The large-message Fast DDS profile on the distribution at hand, without torch.

config/fastdds_large_messages.xml lists its transports with the built-in ones off (Fast DDS
2.6.0-2.6.6 send through the built-in 512 KiB segment whenever it exists). These tests check
what that must give on every distribution, the Humble stand-in included: one shared-memory
segment per participant, of 32 MiB, and camera-sized requests that still cross between
processes with and without the profile (discovery and the transports work as without it).
"""

import json
import os
import re
import subprocess
import sys

from conftest import python_script, TEST_DIR
import pytest

pytestmark = pytest.mark.ros

# Fast DDS 2 (Humble 2.6, Jazzy 2.14) reads the first, Fast DDS 3 (Kilted and later) the
# second; Fast DDS 3 given both loads the file twice and rejects the repeated transport ids.
PROFILE_VARS = ('FASTRTPS_DEFAULT_PROFILES_FILE', 'FASTDDS_DEFAULT_PROFILES_FILE')
FAST_DDS_2_DISTROS = ('foxy', 'galactic', 'humble', 'iron', 'jazzy')
SEGMENT = 32 * 1024 * 1024
# A participant's segment file: fastrtps_<16 hex> (Fast DDS 2) or fastdds_<16 hex> (3).
SEGMENT_FILE = re.compile(r'^fast(rtps|dds)_[0-9a-f]{16}$')

CLIENT = r"""
import json, sys, time
import numpy as np
import rclpy
from vlm_ros_interfaces.srv import Query
rclpy.init()
node = rclpy.create_node('profile_client')
client = node.create_client(Query, 'echo_query')
assert client.wait_for_service(timeout_sec=60), 'no echo_query service'
time.sleep(0.3)
rgb = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
request = Query.Request(prompt='large')
request.image.height, request.image.width, request.image.encoding = 480, 640, 'rgb8'
request.image.step, request.image.data = 640 * 3, rgb.tobytes()
future = client.call_async(request)
rclpy.spin_until_future_complete(node, future, timeout_sec=60)
assert future.done(), 'no answer within 60 s'
print(json.dumps({'echo': json.loads(future.result().text),
                  'checksum': int(rgb.astype(np.int64).sum() % 65521)}))
node.destroy_node()
rclpy.shutdown()
"""


def profile_file():
    """Return the installed profile (the colcon install the tests run against)."""
    from ament_index_python.packages import get_package_share_directory
    path = os.path.join(get_package_share_directory('vlm_ros'), 'config',
                        'fastdds_large_messages.xml')
    assert os.path.isfile(path), f'{path} is not installed; build first'
    return path


def env_with(profile):
    """Return this environment with the profile for this distro's Fast DDS, or without."""
    env = {k: v for k, v in os.environ.items() if k not in PROFILE_VARS}
    if profile:
        fast_dds_2 = os.environ.get('ROS_DISTRO') in FAST_DDS_2_DISTROS
        env[PROFILE_VARS[0] if fast_dds_2 else PROFILE_VARS[1]] = profile_file()
    return env


@pytest.mark.skipif(not os.path.isdir('/dev/shm'), reason='Fast DDS segments live in /dev/shm')
def test_one_segment_of_32_mib_per_participant():
    """The profile parses here and replaces the built-in 512 KiB segment, not adds to it."""
    # This participant's segments: created while it started and mapped by it (other processes
    # on the machine create segments too, and peers in the domain get theirs mapped).
    probe = ('import json, os, rclpy\n'
             'before = set(os.listdir("/dev/shm"))\n'
             'rclpy.init()\n'
             'node = rclpy.create_node("vlm_profile_probe")\n'
             'mapped = {line.split()[-1] for line in open("/proc/self/maps")\n'
             '          if "/dev/shm/" in line}\n'
             'own = {p for p in mapped if os.path.basename(p) not in before}\n'
             'print(json.dumps({os.path.basename(p): os.path.getsize(p) for p in own\n'
             '                  if os.path.exists(p)}))\n'
             'node.destroy_node()\n'
             'rclpy.shutdown()\n')
    # Default discovery: with ROS_LOCALHOST_ONLY=1 (Humble) or
    # ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST (Jazzy and later) rmw_fastrtps turns the built-in
    # transports off itself and appends its own default shared-memory (and UDPv4) transport
    # after the profile's, so there a second, 512 KiB segment is expected. ROS_DOMAIN_ID (set
    # by conftest) still keeps the probe to itself.
    env = {k: v for k, v in env_with(True).items()
           if k not in ('ROS_LOCALHOST_ONLY', 'ROS_AUTOMATIC_DISCOVERY_RANGE')}
    out = subprocess.run([sys.executable, '-c', probe], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert 'XMLPARSER' not in out.stderr, out.stderr[-3000:]
    files = json.loads(out.stdout.strip().splitlines()[-1])
    segments = [size for name, size in files.items() if SEGMENT_FILE.match(name)]
    assert len(segments) == 1 and segments[0] >= SEGMENT, files


@pytest.mark.parametrize('server_profile, client_profile',
                         [(True, False), (False, True), (True, True)])
def test_camera_frame_crosses_with_and_without_the_profile(server_profile, client_profile):
    """A 640x480 rgb8 request (900 KiB) goes both ways between profile and default peers."""
    server = subprocess.Popen(python_script(TEST_DIR / 'query_echo_server.py'),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env_with(server_profile))
    try:
        assert server.stdout.readline().strip() == 'echo server ready', server.stderr.read()
        out = subprocess.run([sys.executable, '-c', CLIENT], env=env_with(client_profile),
                             capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stderr[-3000:]
        assert 'XMLPARSER' not in out.stderr, out.stderr[-3000:]
        answer = json.loads(out.stdout.strip().splitlines()[-1])
        assert answer['echo']['image'][:5] == [480, 640, 'rgb8', 1920, 480 * 640 * 3]
        assert answer['echo']['checksum'] == answer['checksum']
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
