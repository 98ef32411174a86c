"""Shared fixtures: an isolated ROS 2 domain per test process and a real node process."""

import fcntl
import functools
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import pytest


def _claim_domain():
    """
    Return a ROS domain id no other running test process of this project holds, and its lock.

    A pid-derived id alone collides now and then when several suites run at once, and then
    one suite's client talks to the other suite's vlm_node; an flock per domain rules that out.
    """
    start = os.getpid() % 100
    for offset in range(100):
        domain = 1 + (start + offset) % 100
        lock = open(os.path.join(tempfile.gettempdir(), f'vlm_ros_test_domain_{domain}.lock'),
                    'w')
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            continue
        return domain, lock
    raise RuntimeError('no free ROS domain id for the tests (100 suites running?)')


# One DDS domain per pytest process, discovery on this host only: parallel runs and other
# sessions on the machine never see each other's nodes. The lock lives as long as the process.
# Humble (and older) read only ROS_LOCALHOST_ONLY; Iron and later read
# ROS_AUTOMATIC_DISCOVERY_RANGE and warn that ROS_LOCALHOST_ONLY is deprecated, so each gets
# only its own variable (the Humble stand-in, ROS_DISTRO=humble, runs Jazzy's rclpy, which
# still honours ROS_LOCALHOST_ONLY=1).
_DOMAIN, _DOMAIN_LOCK = _claim_domain()
os.environ['ROS_DOMAIN_ID'] = str(_DOMAIN)
if os.environ.get('ROS_DISTRO') in ('foxy', 'galactic', 'humble'):
    os.environ['ROS_LOCALHOST_ONLY'] = '1'
    os.environ.pop('ROS_AUTOMATIC_DISCOVERY_RANGE', None)
else:
    os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
    os.environ.pop('ROS_LOCALHOST_ONLY', None)
os.environ.setdefault('RCUTILS_LOGGING_BUFFERED_STREAM', '0')

REPO = pathlib.Path(__file__).resolve().parents[2]
TEST_DIR = pathlib.Path(__file__).resolve().parent


def installed_executable(package, name):
    """Find an installed executable the way ``ros2 run`` does (ament index prefix)."""
    from ament_index_python.packages import get_package_prefix
    path = pathlib.Path(get_package_prefix(package)) / 'lib' / package / name
    assert path.is_file(), f'{path} is not installed; run the colcon build first'
    return path


class LoggedProcess:
    """An installed executable running in the background, its output kept in a file."""

    def __init__(self, log_path, cmd, env=None):
        self.log_path = pathlib.Path(log_path)
        self._log = open(self.log_path, 'w')
        self.proc = subprocess.Popen([str(c) for c in cmd], stdout=self._log,
                                     stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})

    def output(self):
        return self.log_path.read_text()

    def wait_for_output(self, text, timeout=30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output():
                return True
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        return text in self.output()

    def stop(self, timeout=15.0):
        """SIGINT like Ctrl-C, then wait; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


class NodeProcess(LoggedProcess):
    """A node executable started with ``--ros-args``."""

    def __init__(self, tmp_path, *ros_args, executable=None, name='vlm_node', env=None):
        exe = executable or installed_executable('vlm_ros', 'vlm_node')
        super().__init__(tmp_path / f'{name}.log', [exe, '--ros-args', *ros_args], env)


@pytest.fixture
def node_process(tmp_path):
    """Start the installed vlm_node with the given ros args; stopped after the test."""
    started = []

    def start(*ros_args, **kwargs):
        proc = NodeProcess(tmp_path, *ros_args, **kwargs)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


@functools.lru_cache(maxsize=1)
def client_qos():
    """Return the service clients' QoS: reliable, a history deep enough for a burst."""
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    return QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)


class RosClient:
    """An rclpy node in its own context, spun by a background thread."""

    def __init__(self, name='vlm_test_client'):
        import rclpy
        from rclpy.executors import MultiThreadedExecutor
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node(name, context=self.context)
        self.executor = MultiThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self._clients = {}
        self._thread = threading.Thread(target=self.executor.spin, daemon=True)
        self._thread.start()

    def client(self, srv_type, name, slot=0, timeout=30.0):
        """Return this node's client number ``slot`` for service ``name``, once it is served."""
        client = self._clients.get((name, slot))
        if client is None:
            # rmw_fastrtps delivers every response of a service to every client of it (each
            # keeps its own by request id): with the default history of 10, a client among a
            # burst of callers can see its reply pushed out by the others' before it takes it.
            client = self.node.create_client(srv_type, name, qos_profile=client_qos())
            self._clients[(name, slot)] = client
            assert client.wait_for_service(timeout_sec=timeout), f'no service {name}'
            # wait_for_service only says the server's request reader matched ours; a reply
            # sent before the server has matched our response reader is lost. Let discovery
            # settle once per client, which is why clients are kept rather than made per call.
            time.sleep(0.3)
        assert client.wait_for_service(timeout_sec=timeout), f'no service {name}'
        return client

    def call(self, srv_type, name, request, timeout=30.0, resend_every=None):
        """
        Call a service, waiting for it to appear first; returns the response.

        ``resend_every`` (seconds) resends an unanswered request: only for idempotent services,
        to ride over a reply lost while a restarted server rediscovers this client.
        """
        client = self.client(srv_type, name, timeout=timeout)
        deadline = time.monotonic() + timeout
        unanswered = 0
        while True:
            future = client.call_async(request)
            resend_at = time.monotonic() + (resend_every or timeout)
            while not future.done() and time.monotonic() < min(deadline, resend_at):
                time.sleep(0.01)
            if future.done() or time.monotonic() >= deadline:
                break
            client.remove_pending_request(future)
            unanswered += 1
            if unanswered % 2 == 0:
                # Once in some dozens of node restarts, Fast DDS 2.14 never matches a kept
                # client with the restarted server (the node is healthy meanwhile): new
                # entities are discovered afresh.
                self.node.destroy_client(self._clients.pop((name, 0)))
                client = self.client(srv_type, name, timeout=max(1.0, deadline - time.monotonic()))
        assert future.done(), f'{name} did not answer within {timeout} s'
        return future.result()

    def call_together(self, srv_type, name, requests, timeout=120.0):
        """Send every request at once, each from its own client; return the responses."""
        clients = [self.client(srv_type, name, slot=i + 1, timeout=timeout)
                   for i in range(len(requests))]
        futures = [c.call_async(r) for c, r in zip(clients, requests, strict=True)]
        deadline = time.monotonic() + timeout
        while not all(f.done() for f in futures) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert all(f.done() for f in futures), f'{name}: some calls were never answered'
        return [f.result() for f in futures]

    def close(self):
        import rclpy
        self.executor.shutdown()
        self._thread.join(5)  # spinning stops before its context goes away
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)


@pytest.fixture
def ros_client():
    client = RosClient()
    yield client
    client.close()


def python_script(path, *args):
    """Command line that runs a helper script with this interpreter."""
    return [sys.executable, str(path), *map(str, args)]


def tiny_model(builder, *args, **kwargs):
    """
    Return a tiny test model from ``vlm_ros_tools.model_cache`` (e.g. ``cached_test_model``).

    With torch it is built when missing; without (the Humble stand-in) it is looked up in
    what an environment with torch built, and the test skips, saying why, when it is not there.
    """
    from vlm_ros_tools import model_cache
    try:
        return getattr(model_cache, builder)(*args, **kwargs)
    except model_cache.NotCached as exc:
        pytest.skip(str(exc))


def free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


class ServeProcess(LoggedProcess):
    """The installed vlm_serve on a free loopback port."""

    def __init__(self, log_dir, *args, env=None):
        self.port = free_port()
        self.base = f'http://127.0.0.1:{self.port}'
        self.url = self.base + '/v1'
        super().__init__(pathlib.Path(log_dir) / f'vlm_serve_{self.port}.log',
                         [installed_executable('vlm_ros', 'vlm_serve'), *args,
                          '--port', self.port], {'PYTHONUNBUFFERED': '1', **(env or {})})

    def wait_ready(self, timeout=60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.output()[-3000:]
            try:
                if httpx.get(self.base + '/health', timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f'vlm_serve did not start: {self.output()[-3000:]}')
