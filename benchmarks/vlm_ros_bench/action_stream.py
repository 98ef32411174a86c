"""
The ``~/generate`` action through a real node: the cost of per-token feedback, cancel latency.

The installed ``vlm_node`` runs the model (int8 vision + Q8_0 language model of the real
SmolVLM2-256M configuration, or the tiny test model with ``--tiny``) with image splitting
off; an ActionClient in this process sends the same goal again and again:

- decode time per token from the result's ``decode_ms / (completion_tokens - 1)``, with
  feedback after every text delta (``feedback_min_interval_ms`` 0) and with feedback held
  back (60000: only the phase changes go out), alternating repetition by repetition so that
  drift of the machine hits both the same;
- cancel latency: a goal with a long answer is cancelled once its feedback reports
  ``CANCEL_AFTER`` tokens; the time from sending the cancel request to receiving the result,
  next to the time per token of the same run (the target: one decode step + 20 ms).

Runs in its own process (``python -m vlm_ros_bench.action_stream SPEC OUT``), like the ROS
overhead measurement.
"""

import os
import time

from vlm_ros_bench import common

NODE_NAME = 'vlm_bench_action'
CANCEL_AFTER = 16


class _Client:
    """An rclpy node in its own context, spun by a background thread."""

    def __init__(self):
        import threading

        import rclpy
        from rclpy.executors import MultiThreadedExecutor

        self.rclpy = rclpy
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node('vlm_bench_action_client', context=self.context)
        self.executor = MultiThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def close(self):
        self.executor.shutdown()
        self.node.destroy_node()
        self.rclpy.try_shutdown(context=self.context)


def _wait(future, timeout):
    deadline = time.monotonic() + timeout
    while not future.done() and time.monotonic() < deadline:
        time.sleep(0.0005)
    if not future.done():
        raise TimeoutError(f'no answer within {timeout} s')
    return future.result()


def _set_interval(client, value, timeout):
    from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
    from rcl_interfaces.srv import SetParameters

    service = client.node.create_client(SetParameters, f'/{NODE_NAME}/set_parameters')
    if not service.wait_for_service(timeout_sec=timeout):
        raise TimeoutError('no parameter service')
    param = Parameter(name='feedback_min_interval_ms', value=ParameterValue(
        type=ParameterType.PARAMETER_INTEGER, integer_value=value))
    result = _wait(service.call_async(SetParameters.Request(parameters=[param])), timeout)
    if not result.results[0].successful:
        raise RuntimeError(result.results[0].reason)


def _counter(seen):
    """Return a feedback callback that appends each completion_tokens to ``seen``."""
    return lambda msg: seen.append(msg.feedback.completion_tokens)


def _goal(client, action, goal, timeout, on_feedback=None):
    handle = _wait(action.send_goal_async(goal, feedback_callback=on_feedback), timeout)
    if not handle.accepted:
        raise RuntimeError('goal rejected')
    return handle


def measure(model_dir, model_label, node_args, threads, reps, new_tokens, log_path,
            timeout=300.0):
    """Start the node and measure feedback cost and cancel latency; return a dict."""
    out = {'status': 'ok', 'error': None, 'model': model_label, 'threads': threads,
           'repetitions': reps, 'new_tokens': new_tokens, 'cancel_after_tokens': CANCEL_AFTER,
           'tpot_feedback_ms': None, 'tpot_no_feedback_ms': None, 'feedback_cost_fraction': None,
           'cancel_latency_ms': None, 'cancel_tpot_ms': None, 'feedback_messages': None,
           'method': ('vlm_ros_interfaces/action/Generate from an rclpy ActionClient to the '
                      'installed vlm_node (its own process, Fast DDS, discovery LOCALHOST); '
                      'TPOT from the result decode_ms / (completion_tokens - 1), feedback '
                      'every delta vs held back, alternating; cancel latency = cancel sent '
                      '-> result received')}
    from vlm_ros_bench.ros_overhead import _messages, running_node
    args = ['-p', f'model_dir:={model_dir}', '-p', f'n_threads:={threads}',
            '-p', f'max_new_tokens:={new_tokens}', '-p', 'feed_type:=1',
            '-p', 'do_image_splitting:=false', *node_args]
    with running_node(NODE_NAME, args, log_path):
        _measure_goals(out, reps, new_tokens, timeout, _messages)
    return out


def _measure_goals(out, reps, new_tokens, timeout, messages):
    """Send the goals to the running node; fill ``out``."""
    from rclpy.action import ActionClient
    from vlm_ros_interfaces.action import Generate

    client = None
    try:
        client = _Client()
        action = ActionClient(client.node, Generate, f'/{NODE_NAME}/generate')
        if not action.wait_for_server(timeout_sec=60.0):
            raise TimeoutError(f'/{NODE_NAME}/generate did not appear within 60 s')
        image = messages('rgb8', 512, 512)[0]['image']
        goal = Generate.Goal(images=[image], prompt=common.PROMPT, max_new_tokens=new_tokens)
        deadline = time.monotonic() + 120
        while True:  # autostart: the server appears before activation ends
            handle = _wait(action.send_goal_async(goal), timeout)
            if handle.accepted or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if not handle.accepted:
            raise RuntimeError('the node rejects goals')
        _wait(handle.get_result_async(), timeout)  # warm-up
        tpot = {0: [], 60000: []}
        counts = []
        for _ in range(reps):
            for interval in (0, 60000):
                _set_interval(client, interval, timeout)
                received = []
                handle = _goal(client, action, goal, timeout, received.append)
                result = _wait(handle.get_result_async(), timeout).result
                if not result.success or result.completion_tokens < 2:
                    raise RuntimeError(f'goal failed: {result.error or "too short"}')
                tpot[interval].append(result.decode_ms / (result.completion_tokens - 1))
                if interval == 0:
                    counts.append(len(received))
        out['tpot_feedback_ms'] = common.summarize(tpot[0])
        out['tpot_no_feedback_ms'] = common.summarize(tpot[60000])
        out['feedback_cost_fraction'] = (out['tpot_feedback_ms']['median']
                                         / out['tpot_no_feedback_ms']['median'] - 1.0)
        out['feedback_messages'] = common.summarize(counts)
        _set_interval(client, 0, timeout)
        latencies, steps = [], []
        long_goal = Generate.Goal(images=[image], prompt=common.PROMPT,
                                  max_new_tokens=max(new_tokens, 4 * CANCEL_AFTER))
        for _ in range(reps):
            seen = []
            handle = _goal(client, action, long_goal, timeout, _counter(seen))
            while not seen or seen[-1] < CANCEL_AFTER:
                time.sleep(0.0002)
            sent = time.perf_counter()
            handle.cancel_goal_async()
            response = _wait(handle.get_result_async(), timeout)
            latencies.append((time.perf_counter() - sent) * 1000.0)
            r = response.result
            if r.completion_tokens > 1:
                steps.append(r.decode_ms / (r.completion_tokens - 1))
        out['cancel_latency_ms'] = common.summarize(latencies)
        out['cancel_tpot_ms'] = common.summarize(steps) if steps else None
    except Exception as exc:  # noqa: B902 -- reported in the results, the run goes on
        out['status'] = 'error'
        out['error'] = f'{type(exc).__name__}: {exc}'
    finally:
        if client is not None:
            client.close()


def _measure_spec(spec):
    return measure(spec['model_dir'], spec['model_label'], spec['node_args'], spec['threads'],
                   spec['reps'], spec['new_tokens'], spec['log_path'])


def measure_in_child(model_dir, model_label, node_args, threads, reps, new_tokens, workdir):
    """Measure in a fresh process (its own rclpy and Fast DDS); return the dict."""
    stem = os.path.join(workdir, 'action')
    spec = {'model_dir': model_dir, 'model_label': model_label, 'node_args': list(node_args),
            'threads': threads, 'reps': reps, 'new_tokens': new_tokens,
            'log_path': stem + '-vlm_node.log'}
    part, failure = common.run_child('vlm_ros_bench.action_stream', spec, stem, dict(os.environ),
                                     600 + 60 * reps, 'action process')
    if part is None:
        part = skipped(failure, model_label, status='error')
    return part


def skipped(why, model=None, status='skipped'):
    """Return the section of a run that did not measure the action."""
    return {'status': status, 'error': why, 'model': model, 'threads': 0, 'repetitions': 0,
            'new_tokens': 0, 'cancel_after_tokens': CANCEL_AFTER, 'tpot_feedback_ms': None,
            'tpot_no_feedback_ms': None, 'feedback_cost_fraction': None,
            'cancel_latency_ms': None, 'cancel_tpot_ms': None, 'feedback_messages': None,
            'method': ''}


def main(argv=None):
    """Measure the action in this process: SPEC.json OUT.json."""
    return common.spec_main(argv, 'vlm_ros_bench.action_stream', _measure_spec)


if __name__ == '__main__':
    raise SystemExit(main())
