"""
What ROS adds: the node's ``Query`` round trip minus the engine's own ``total_ms``.

The installed ``vlm_node`` is started as ``ros2 run`` would (ament index prefix) in its own
DDS domain limited to this host, with the given model; a client in this process (its own
rclpy context, ``spin_until_future_complete`` on the calling thread, so no polling interval
is added) sends each image several times. The difference covers request serialization and
transport over Fast DDS, the executor hand-offs, the node's queue, converting the message
to an array (JPEG decoding included for ``CompressedImage``) and the response's way back;
preprocessing and inference are inside ``total_ms`` and excluded. The in-process share
(serialize, deserialize, convert, measured here without DDS) is reported beside it.

Each transport setting (Fast DDS's defaults, and the package's large-message profile)
runs in a fresh process (``python -m vlm_ros_bench.ros_overhead SPEC OUT``): Fast DDS reads
its profiles file once per process.
"""

import contextlib
import os
import signal
import subprocess
import time

from vlm_ros_bench import common

CASES = (
    ('rgb8 640x480', 'rgb8', 640, 480),
    ('rgb8 1920x1080', 'rgb8', 1920, 1080),
    ('jpeg 640x480', 'jpeg', 640, 480),
    ('jpeg 1920x1080', 'jpeg', 1920, 1080),
)
NODE_NAME = 'vlm_bench_node'
# Fast DDS 3 (Kilted and later) reads the first, Fast DDS 2 (Humble: 2.6, Jazzy: 2.14) only
# the second; setting both on Fast DDS 3 loads the file twice and rejects the repeated
# transport id.
PROFILE_VARS = ('FASTDDS_DEFAULT_PROFILES_FILE', 'FASTRTPS_DEFAULT_PROFILES_FILE')
FAST_DDS_2_DISTROS = ('humble', 'jazzy')


def profile_file():
    """Return the installed large-message Fast DDS profile of the vlm_ros package."""
    from ament_index_python.packages import get_package_share_directory

    path = os.path.join(get_package_share_directory('vlm_ros'), 'config',
                        'fastdds_large_messages.xml')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path} is not installed; build first (scripts/build.sh)')
    return path


def transports():
    """Return (name, Fast DDS profiles file or None) of every setting to measure."""
    return [('fastdds default', None), ('large-message profile', profile_file())]


def transport_env(profile):
    """Return this process's environment with ``profile`` (None: no profile) for Fast DDS."""
    env = {k: v for k, v in os.environ.items() if k not in PROFILE_VARS}
    if profile:
        fast_dds_2 = env.get('ROS_DISTRO') in FAST_DDS_2_DISTROS
        env[PROFILE_VARS[1] if fast_dds_2 else PROFILE_VARS[0]] = profile
    return env


def measure_transports(model_dir, model_label, threads, reps, warmup, workdir, new_tokens=2):
    """Measure every transport setting, each in its own process; return one dict."""
    out = None
    for name, profile in transports():
        stem = os.path.join(workdir, f'ros-{name.replace(" ", "-")}')
        spec = {'model_dir': model_dir, 'model_label': model_label, 'threads': threads,
                'reps': reps, 'warmup': warmup, 'log_path': stem + '-vlm_node.log',
                'new_tokens': new_tokens}
        part, failure = common.run_child('vlm_ros_bench.ros_overhead', spec, stem,
                                         transport_env(profile),
                                         300 + 120 * len(CASES) * (reps + warmup),
                                         'ros overhead process')
        if part is None:
            part = {'status': 'error', 'error': failure, 'model': model_label, 'cases': []}
        for case in part['cases']:
            case['transport'] = name
        if out is None:
            out = dict(part, cases=[], transports=[])
        out['transports'].append({'name': name, 'profile': profile})
        out['cases'] += part['cases']
        if part['status'] != 'ok' and out['status'] == 'ok':
            out.update(status=part['status'], error=f'{name}: {part["error"]}')
    return out


def _messages(kind, width, height):
    import cv2
    from sensor_msgs.msg import CompressedImage, Image

    rgb = cv2.resize(common.bench_image(), (width, height), interpolation=cv2.INTER_LINEAR)
    if kind == 'rgb8':
        msg = Image(height=height, width=width, encoding='rgb8', step=width * 3,
                    data=rgb.tobytes())
        msg.header.frame_id = 'camera'
        return {'image': msg}, len(msg.data)
    ok, jpeg = cv2.imencode('.jpg', rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise RuntimeError('cv2 cannot encode JPEG')
    msg = CompressedImage(format='jpeg', data=jpeg.tobytes())
    msg.header.frame_id = 'camera'
    return {'compressed_image': msg}, len(msg.data)


def _local_costs(fields, repeat=10):
    """
    Median in-process costs of one request, without DDS: serialize, deserialize, to array.

    What remains of the overhead is transport and the hand-offs between threads.
    """
    from rclpy.serialization import deserialize_message, serialize_message
    from vlm_ros.ros import messages
    from vlm_ros_interfaces.srv import Query

    request = Query.Request(**fields)
    raw = serialize_message(request)
    received = deserialize_message(raw, Query.Request)
    if 'image' in fields:
        def convert():
            return messages.image_to_array(received.image)
    else:
        def convert():
            return messages.compressed_to_array(received.compressed_image)

    def median_ms(fn):
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1000.0)
        return sorted(times)[len(times) // 2]

    return {'serialize_ms': median_ms(lambda: serialize_message(request)),
            'deserialize_ms': median_ms(lambda: deserialize_message(raw, Query.Request)),
            'to_array_ms': median_ms(convert)}


def _node_executable():
    from ament_index_python.packages import get_package_prefix

    path = os.path.join(get_package_prefix('vlm_ros'), 'lib', 'vlm_ros', 'vlm_node')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path} is not installed; build first (scripts/build.sh)')
    return path


class _Client:
    """An rclpy node in its own context, spun on the calling thread."""

    def __init__(self):
        import rclpy
        from rclpy.executors import SingleThreadedExecutor

        self.rclpy = rclpy
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node('vlm_bench_client', context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)

    def call(self, client, request, timeout):
        future = client.call_async(request)
        self.executor.spin_until_future_complete(future, timeout_sec=timeout)
        if not future.done():
            raise TimeoutError(f'no answer within {timeout} s')
        return future.result()

    def close(self):
        self.executor.shutdown()
        self.node.destroy_node()
        self.rclpy.try_shutdown(context=self.context)


def measure(model_dir, model_label, threads, reps, warmup, log_path, new_tokens=2,
            timeout=120.0):
    """Start the node on ``model_dir`` and measure every image case; return a dict."""
    out = {'status': 'ok', 'error': None, 'model': model_label, 'model_dir': model_dir,
           'node': NODE_NAME, 'threads': threads, 'repetitions': reps, 'warmup': warmup,
           'new_tokens': new_tokens, 'cases': [],
           'method': ('round trip of vlm_ros_interfaces/srv/Query from an rclpy client '
                      '(spin_until_future_complete) minus the response total_ms; the node '
                      'runs as its own process on the same host (Fast DDS, discovery '
                      'LOCALHOST)')}
    args = ['-p', f'model_dir:={model_dir}', '-p', f'n_threads:={threads}',
            '-p', f'max_new_tokens:={new_tokens}', '-p', 'queue_size:=2',
            '-p', 'do_image_splitting:=false']
    with running_node(NODE_NAME, args, log_path):
        _measure_cases(out, reps, warmup, new_tokens, timeout)
    return out


def _measure_cases(out, reps, warmup, new_tokens, timeout):
    """Call the running node with every image case; fill ``out``."""
    from vlm_ros_interfaces.srv import Query

    client = None
    try:
        client = _Client()
        service = client.node.create_client(Query, f'/{NODE_NAME}/query')
        if not service.wait_for_service(timeout_sec=60.0):
            raise TimeoutError(f'/{NODE_NAME}/query did not appear within 60 s')
        first, _ = _messages('rgb8', 64, 48)
        deadline = time.monotonic() + 60.0
        while True:  # autostart: configure + activate run after the service appears
            response = client.call(service, Query.Request(**first), timeout)
            if response.success or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if not response.success:
            raise RuntimeError(f'the node does not answer: {response.error}')
        for label, kind, width, height in CASES:
            fields, size = _messages(kind, width, height)
            request = Query.Request(max_new_tokens=new_tokens, **fields)
            trips, totals, errors = [], [], []
            for i in range(warmup + reps):
                start = time.perf_counter()
                response = client.call(service, request, timeout)
                trip = (time.perf_counter() - start) * 1000.0
                if not response.success:
                    errors.append(response.error)
                    continue
                if i >= warmup:
                    trips.append(trip)
                    totals.append(response.total_ms)
            out['cases'].append({
                'name': label, 'encoding': kind, 'width': width, 'height': height,
                'message_bytes': size, 'in_process': _local_costs(fields),
                'round_trip_ms': common.summarize(trips),
                'engine_total_ms': common.summarize(totals),
                'overhead_ms': common.summarize([t - e for t, e in
                                                 zip(trips, totals, strict=True)]),
                'errors': errors[:3],
            })
        service.destroy()
    except Exception as exc:  # noqa: B902 -- reported in the results, the run goes on
        out['status'] = 'error'
        out['error'] = f'{type(exc).__name__}: {exc}'
    finally:
        if client is not None:
            client.close()


def isolate_ros():
    """
    Put this process on a DDS domain of its own with discovery limited to this host.

    Returns the environment for the node's process; an rclpy context of this process must be
    made after this call to find the node.
    """
    env = dict(os.environ)
    env.setdefault('ROS_DOMAIN_ID', str(1 + os.getpid() % 100))
    if env.get('ROS_DISTRO') == 'humble':  # Humble reads only this one
        env.setdefault('ROS_LOCALHOST_ONLY', '1')
    else:
        env['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
    os.environ.update({k: v for k, v in env.items() if k.startswith('ROS_')})
    return env


@contextlib.contextmanager
def running_node(name, ros_args, log_path):
    """
    Run the installed vlm_node as ``name`` with ``ros_args`` while the block runs.

    Its own process, on a DDS domain of this process's and discovery limited to this host
    (the variable the distribution reads); its output goes to ``log_path``; SIGINT at the end.
    """
    env = isolate_ros()
    cmd = [_node_executable(), '--ros-args', '-r', f'__node:={name}', *ros_args]
    with open(log_path, 'w') as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _measure_spec(spec):
    return measure(spec['model_dir'], spec['model_label'], spec['threads'], spec['reps'],
                   spec['warmup'], spec['log_path'], new_tokens=spec['new_tokens'])


def main(argv=None):
    """Measure one transport setting (the environment's): SPEC.json OUT.json."""
    return common.spec_main(argv, 'vlm_ros_bench.ros_overhead', _measure_spec)


if __name__ == '__main__':
    raise SystemExit(main())
