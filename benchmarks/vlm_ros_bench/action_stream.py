"""
The ``~/generate`` action through a real node: the cost of per-token feedback, cancel latency.

The installed ``vlm_node`` runs the model (int8 vision + Q8_0 language model of the real
SmolVLM2-256M configuration, or the tiny test model with ``--tiny``) with image splitting
off; an ActionClient in this process sends the same goal again and again:

- decode time per token from the result's ``decode_ms / (completion_tokens - 1)``, with
  feedback after every text delta (``feedback_min_interval_ms`` 0) and with feedback held
  back (60000: only the phase changes go out), in pairs whose order alternates (on, off;
  off, on) so that drift of the machine hits both the same; the cost is given both as the
  ratio of the medians and as the median of the pairs' ratios (the steadier one where the
  machine's speed wanders from goal to goal);
- the same feedback cost with a lean caller (``lean``): goals through the action's own
  services, the feedback read by a DDS reader of another rclpy context that this process
  never spins. The node writes every delta and the transport delivers it as before, but no
  rclpy executor wakes for it: what the node itself costs, beside what an rclpy
  ``ActionClient`` in the same computer costs (its executor's work for every message);
- cancel latency: a goal with a long answer is cancelled once its feedback reports
  ``CANCEL_AFTER`` tokens; the time from sending the cancel request to receiving the result,
  next to the time per token of the same run (the target: one decode step + 20 ms);
- the feedback cost again with one core fewer decoding (``spare_core``): where every core
  decodes, the transport's work for each feedback message (the node's DDS writer, the
  caller's reader) takes a core from a decode thread that the others then wait for.

Runs in its own process (``python -m vlm_ros_bench.action_stream SPEC OUT``), like the ROS
overhead measurement.
"""

import contextlib
import os
import time

from vlm_ros_bench import common

NODE_NAME = 'vlm_bench_action'
CANCEL_AFTER = 16
HELD_BACK = 60000
"""``feedback_min_interval_ms`` that holds the text back (only phase changes go out)."""


class _Client:
    """
    An rclpy node in its own context, spun on the calling thread.

    One thread and no polling: the client's own CPU time competes with the node's decode
    threads on a small machine, and the measurement is of the node.
    """

    def __init__(self, name='vlm_bench_action_client'):
        import rclpy
        from rclpy.executors import SingleThreadedExecutor

        self.rclpy = rclpy
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node(name, context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)

    def wait(self, future, timeout):
        """Spin until ``future`` is done; return its result."""
        self.executor.spin_until_future_complete(future, timeout_sec=timeout)
        if not future.done():
            raise TimeoutError(f'no answer within {timeout} s')
        return future.result()

    def spin_until(self, predicate, timeout):
        """Spin until ``predicate()`` holds (checked after every callback)."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f'not reached within {timeout} s')
            self.executor.spin_once(timeout_sec=0.1)

    def close(self):
        self.executor.shutdown()
        self.node.destroy_node()
        self.rclpy.try_shutdown(context=self.context)


def _set_interval(client, value, timeout):
    from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
    from rcl_interfaces.srv import SetParameters

    service = client.node.create_client(SetParameters, f'/{NODE_NAME}/set_parameters')
    try:
        if not service.wait_for_service(timeout_sec=timeout):
            raise TimeoutError('no parameter service')
        param = Parameter(name='feedback_min_interval_ms', value=ParameterValue(
            type=ParameterType.PARAMETER_INTEGER, integer_value=value))
        result = client.wait(service.call_async(SetParameters.Request(parameters=[param])),
                             timeout)
    finally:
        client.node.destroy_client(service)
    if not result.results[0].successful:
        raise RuntimeError(result.results[0].reason)


def _counter(seen):
    """Return a feedback callback that appends each completion_tokens to ``seen``."""
    return lambda msg: seen.append(msg.feedback.completion_tokens)


def _goal(client, action, goal, timeout, on_feedback=None):
    handle = client.wait(action.send_goal_async(goal, feedback_callback=on_feedback), timeout)
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
           'feedback_cost_paired': None, 'lean': None, 'spare_core': None,
           'method': ('vlm_ros_interfaces/action/Generate from an rclpy ActionClient (one '
                      'thread, no polling) to the installed vlm_node (its own process, Fast '
                      'DDS, discovery LOCALHOST); TPOT from the result decode_ms / '
                      '(completion_tokens - 1), feedback every delta vs held back, '
                      'in pairs of alternating order; cancel latency = cancel sent -> result '
                      'received')}
    from vlm_ros_bench.ros_overhead import isolate_ros

    isolate_ros()
    client = None
    try:
        client = _Client()
        with _node(client, model_dir, node_args, threads, new_tokens, log_path, timeout) as goal:
            out.update(_feedback_cost(client, goal, reps, timeout))
            out['lean'] = _feedback_cost(client, goal, reps, timeout, lean=True)
            out.update(_cancel_latency(client, goal, reps, new_tokens, timeout))
        if threads > 1:
            # The same with one core left to the transport and the caller: on a machine whose
            # every core decodes, each feedback's DDS work delays a decode thread.
            spare_log = log_path.replace('.log', '-spare.log')
            with _node(client, model_dir, node_args, threads - 1, new_tokens, spare_log,
                       timeout) as goal:
                out['spare_core'] = {'threads': threads - 1,
                                     **_feedback_cost(client, goal, reps, timeout)}
    except Exception as exc:  # noqa: B902 -- reported in the results, the run goes on
        out['status'] = 'error'
        out['error'] = f'{type(exc).__name__}: {exc}'
    finally:
        if client is not None:
            client.close()
    return out


@contextlib.contextmanager
def _node(client, model_dir, node_args, threads, new_tokens, log_path, timeout):
    """Run the node with ``threads``; yield ``(ActionClient, goal image)`` once it takes goals."""
    from rclpy.action import ActionClient
    from vlm_ros_bench.ros_overhead import _messages, running_node
    from vlm_ros_interfaces.action import Generate

    args = ['-p', f'model_dir:={model_dir}', '-p', f'n_threads:={threads}',
            '-p', f'max_new_tokens:={new_tokens}', '-p', 'feed_type:=1',
            '-p', 'do_image_splitting:=false', *node_args]
    with running_node(NODE_NAME, args, log_path):
        action = ActionClient(client.node, Generate, f'/{NODE_NAME}/generate')
        try:
            if not action.wait_for_server(timeout_sec=60.0):
                raise TimeoutError(f'/{NODE_NAME}/generate did not appear within 60 s')
            image = _messages('rgb8', 512, 512)[0]['image']
            goal = Generate.Goal(images=[image], prompt=common.PROMPT,
                                 max_new_tokens=new_tokens)
            deadline = time.monotonic() + 120
            while True:  # autostart: the server appears before activation ends
                handle = client.wait(action.send_goal_async(goal), timeout)
                if handle.accepted or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            if not handle.accepted:
                raise RuntimeError('the node rejects goals')
            client.wait(handle.get_result_async(), timeout)  # warm-up
            yield action, goal
        finally:
            action.destroy()


def _feedback_cost(client, node_goal, reps, timeout, lean=False):
    """
    Decode time per token with feedback every delta and held back, in pairs.

    The order in a pair alternates, so a machine getting faster or slower favours neither.
    ``lean``: goals through the action's services and the feedback read by a reader that is
    never spun (``_LeanCaller``), instead of an ``ActionClient`` with a feedback callback.
    """
    action, goal = node_goal
    tpot = {0: [], HELD_BACK: []}
    paired, counts = [], []
    caller = _LeanCaller(client) if lean else None
    try:
        for rep in range(reps):
            pair = {}
            for interval in ((0, HELD_BACK) if rep % 2 == 0 else (HELD_BACK, 0)):
                _set_interval(client, interval, timeout)
                if caller is not None:
                    result, received = caller.run(goal, timeout)
                else:
                    seen = []
                    handle = _goal(client, action, goal, timeout, seen.append)
                    result = client.wait(handle.get_result_async(), timeout).result
                    received = len(seen)
                if not result.success or result.completion_tokens < 2:
                    raise RuntimeError(f'goal failed: {result.error or "too short"}')
                pair[interval] = result.decode_ms / (result.completion_tokens - 1)
                tpot[interval].append(pair[interval])
                if interval == 0:
                    counts.append(received)
            paired.append(pair[0] / pair[HELD_BACK] - 1.0)
    finally:
        if caller is not None:
            caller.close()
    _set_interval(client, 0, timeout)
    on, off = common.summarize(tpot[0]), common.summarize(tpot[HELD_BACK])
    return {'tpot_feedback_ms': on, 'tpot_no_feedback_ms': off,
            'feedback_cost_fraction': on['median'] / off['median'] - 1.0,
            'feedback_cost_paired': common.summarize(paired),
            'feedback_messages': common.summarize(counts)}


class _LeanCaller:
    """
    Goals through the action's own services; feedback read by a reader nobody spins.

    The reader lives in an rclpy context of its own: DDS receives every feedback message
    into it while a goal runs, and the messages are taken (and counted) only after the
    result, so no executor of this process works per message during decoding.
    """

    def __init__(self, client):
        from vlm_ros.ros.generate_action import FEEDBACK_QOS
        from vlm_ros_interfaces.action import Generate

        self._client = client
        self._impl = Generate.Impl
        base = f'/{NODE_NAME}/generate/_action/'
        self._send = client.node.create_client(Generate.Impl.SendGoalService, base + 'send_goal')
        self._result = client.node.create_client(Generate.Impl.GetResultService,
                                                 base + 'get_result')
        self._reader = _Client('vlm_bench_feedback_reader')
        self._received = 0
        self._reader.node.create_subscription(Generate.Impl.FeedbackMessage, base + 'feedback',
                                              self._count, FEEDBACK_QOS)
        deadline = time.monotonic() + 30
        while not (self._send.service_is_ready() and self._result.service_is_ready()
                   and self._reader.node.count_publishers(base + 'feedback') > 0):
            if time.monotonic() > deadline:
                raise TimeoutError('the action services or feedback topic did not appear')
            time.sleep(0.1)

    def _count(self, _msg):
        self._received += 1

    def run(self, goal, timeout):
        """Send ``goal``, wait for its result; return ``(result, feedback messages read)``."""
        import uuid

        from unique_identifier_msgs.msg import UUID

        goal_id = UUID(uuid=list(uuid.uuid4().bytes))
        accepted = self._client.wait(self._send.call_async(
            self._impl.SendGoalService.Request(goal_id=goal_id, goal=goal)), timeout)
        if not accepted.accepted:
            raise RuntimeError('goal rejected')
        response = self._client.wait(self._result.call_async(
            self._impl.GetResultService.Request(goal_id=goal_id)), timeout)
        self._received = 0
        # Every message was written before the result; take what DDS holds for the reader.
        idle_since = time.monotonic()
        while time.monotonic() - idle_since < 0.2:
            before = self._received
            self._reader.executor.spin_once(timeout_sec=0.05)
            if self._received != before:
                idle_since = time.monotonic()
        return response.result, self._received

    def close(self):
        self._client.node.destroy_client(self._send)
        self._client.node.destroy_client(self._result)
        self._reader.close()


def _cancel_latency(client, node_goal, reps, new_tokens, timeout):
    """Cancel goals once their feedback reports CANCEL_AFTER tokens; time the results."""
    from vlm_ros_interfaces.action import Generate

    action, goal = node_goal
    latencies, steps = [], []
    long_goal = Generate.Goal(images=goal.images, prompt=goal.prompt,
                              max_new_tokens=max(new_tokens, 4 * CANCEL_AFTER))
    for _ in range(reps):
        seen = []
        handle = _goal(client, action, long_goal, timeout, _counter(seen))
        client.spin_until(lambda seen=seen: seen and seen[-1] >= CANCEL_AFTER, timeout)
        sent = time.perf_counter()
        handle.cancel_goal_async()
        response = client.wait(handle.get_result_async(), timeout)
        latencies.append((time.perf_counter() - sent) * 1000.0)
        r = response.result
        if r.completion_tokens > 1:
            steps.append(r.decode_ms / (r.completion_tokens - 1))
    return {'cancel_latency_ms': common.summarize(latencies),
            'cancel_tpot_ms': common.summarize(steps) if steps else None}


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
            'feedback_cost_paired': None, 'lean': None, 'spare_core': None, 'method': ''}


def main(argv=None):
    """Measure the action in this process: SPEC.json OUT.json."""
    return common.spec_main(argv, 'vlm_ros_bench.action_stream', _measure_spec)


if __name__ == '__main__':
    raise SystemExit(main())
