"""
The ``~/generate`` action: several images, history, streamed feedback and cancellation.

A goal takes a place in the node's one queue when it is accepted (rejected at once when the
node is not active or the queue is full; the reason is logged). Its answer streams back as
feedback -- the text as it is produced, the token count and the phase -- throttled by
``feedback_min_interval_ms`` (0: every delta), and the concatenated ``text_delta``s equal
the result's ``text``. Cancel stops generation within one decode step (CANCELED, with the
partial text); a goal cancelled while queued never runs the model. Deactivate and shutdown
abort running and queued goals.
"""

import queue
import threading
import time

from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.qos import QoSProfile, ReliabilityPolicy
from vlm_ros.engine.datatypes import FINISH_CANCELLED
from vlm_ros.engine.errors import VlmError
from vlm_ros.ros import messages
from vlm_ros.ros.messages import Answer
from vlm_ros.ros.request_queue import Busy, Closed
from vlm_ros_interfaces.action import Generate

# Feedback is the answer's text: none may be dropped while a caller reads slowly.
FEEDBACK_QOS = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE)


class _Outbox:
    """
    One thread that publishes every goal's feedback, in order.

    A DDS write costs a few hundred microseconds of the writing thread on a small computer
    (serialisation, the transport's system calls). Written from the decode loop, it would
    lengthen every decode step by that much; written here, it overlaps the next step.
    """

    def __init__(self, logger):
        self._logger = logger
        self._queue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name='vlm_feedback', daemon=True)
        self._thread.start()

    def post(self, goal_handle, msg):
        self._queue.put((goal_handle, msg))

    def drain(self, timeout):
        """Wait until everything posted so far has been published."""
        done = threading.Event()
        self._queue.put((None, done))
        return done.wait(timeout)

    def close(self):
        self._queue.put(None)
        self._thread.join(timeout=2.0)

    def _run(self):
        while True:
            item = self._queue.get()
            if item is None:
                return
            goal_handle, msg = item
            if goal_handle is None:
                msg.set()
                continue
            try:
                goal_handle.publish_feedback(msg)
            except Exception as exc:  # noqa: B902 -- e.g. a goal handle already destroyed
                self._logger.debug(f'feedback not published: {exc}')


class _Feedback:
    """Collects text deltas, token counts and phases; posts them, throttled, to the outbox."""

    def __init__(self, goal_handle, outbox, min_interval_s, accepted_at):
        self._goal = goal_handle
        self._outbox = outbox
        self._interval = min_interval_s
        self._accepted_at = accepted_at
        self._lock = threading.Lock()
        self._pending = ''
        self._tokens = 0
        self._phase = 'queued'
        self._last = 0.0

    def phase(self, name):
        with self._lock:
            self._phase = name
            self._post_locked(force=True)

    def text(self, delta):
        with self._lock:
            self._pending += messages.ros_text(delta)
            self._post_locked(force=False)

    def tokens(self, count):
        self._tokens = count

    def flush(self, timeout=2.0):
        """Post what the throttle held back and wait until it is out (before the result)."""
        with self._lock:
            if self._pending:
                self._post_locked(force=True)
        self._outbox.drain(timeout)

    def _post_locked(self, force):
        now = time.monotonic()
        if not force and now - self._last < self._interval:
            return
        self._last = now
        self._outbox.post(self._goal, Generate.Feedback(
            text_delta=self._pending, completion_tokens=self._tokens, phase=self._phase,
            elapsed_ms=(now - self._accepted_at) * 1000.0))
        self._pending = ''


class GenerateAction:
    """The action server of a ``VlmNode`` (it exists in every state, like ``~/query``)."""

    def __init__(self, node, qos):
        self.node = node
        self._goals = {}
        self._lock = threading.Lock()
        self._outbox = _Outbox(node.get_logger())
        self.server = ActionServer(
            node, Generate, '~/generate', self._execute,
            goal_callback=self._on_goal, handle_accepted_callback=self._on_accepted,
            cancel_callback=self._on_cancel, callback_group=ReentrantCallbackGroup(),
            goal_service_qos_profile=qos, cancel_service_qos_profile=qos,
            feedback_pub_qos_profile=FEEDBACK_QOS)

    def destroy(self):
        """Destroy the action server (node shutdown)."""
        self.server.destroy()
        self._outbox.close()

    def _on_goal(self, goal):
        """Accept while active with room in the queue (the place is held); reject otherwise."""
        try:
            if not self.node.is_active():
                raise Closed()
            self.node.queue.reserve()
        except Busy:
            self.node.stats.refuse()
            self.node.get_logger().warning(
                f'generate goal rejected: busy: {self.node.queue.capacity} requests already '
                'held (queue_size)')
            return GoalResponse.REJECT
        except Closed:
            self.node.stats.refuse()
            self.node.get_logger().warning('generate goal rejected: node is not active')
            return GoalResponse.REJECT
        return GoalResponse.ACCEPT

    def _on_accepted(self, goal_handle):
        """Build the job and take the held place; then run ``_execute``."""
        node = self.node
        feedback = _Feedback(goal_handle, self._outbox,
                             node.param('feedback_min_interval_ms') / 1000.0, time.monotonic())
        entry = {'feedback': feedback, 'job': None, 'error': None,
                 'done': node.answer_future(), 'header': None}
        try:
            goal = goal_handle.request
            overrides = messages.generation_overrides(goal)
            prompt = messages.check_prompt(goal.prompt) or node.param('user_prompt')
            system = messages.check_prompt(goal.system_prompt, 'system_prompt') or \
                node.param('system_prompt')
            history = [messages.check_prompt(turn, 'history') for turn in goal.history]
            source = node.images_source(goal.images, goal.compressed_images)
            entry['header'] = source.header
            entry['job'] = node.make_job(
                source, prompt, system, overrides, history=history,
                progress={'on_text': feedback.text, 'on_phase': feedback.phase,
                          'on_token': feedback.tokens}, on_done=entry['done'].set_job)
            # Before the worker can take the job, so that 'queued' is always the first phase.
            feedback.phase('queued')
            node.queue.submit(entry['job'], reserved=True)
            entry['done'].watch(entry['job'])
        except VlmError as exc:
            node.queue.release()
            entry['error'] = str(exc)
        except Closed:
            entry['error'] = messages.NOT_ACTIVE
        with self._lock:
            self._goals[bytes(goal_handle.goal_id.uuid)] = entry
        goal_handle.execute()

    def _on_cancel(self, goal_handle):
        with self._lock:
            entry = self._goals.get(bytes(goal_handle.goal_id.uuid))
        if entry is not None and entry['job'] is not None:
            self.node.queue.cancel(entry['job'])
        return CancelResponse.ACCEPT

    async def _execute(self, goal_handle):
        """Await the job (no thread waits), then end the goal: succeeded, canceled, aborted."""
        with self.node.in_flight():
            key = bytes(goal_handle.goal_id.uuid)
            with self._lock:
                entry = self._goals[key]
            if entry['error'] is not None:
                answer = Answer(error=entry['error'])
            else:
                answer = await entry['done'].future
                entry['feedback'].flush()
            with self._lock:
                del self._goals[key]
            result = messages.fill_result(Generate.Result(), answer, header=entry['header'])
            if goal_handle.is_cancel_requested and answer.finish_reason == FINISH_CANCELLED:
                result.error = result.error or 'cancelled by the caller'
                goal_handle.canceled()
            elif answer.success:
                goal_handle.succeed()
            else:
                goal_handle.abort()
                self.node.get_logger().warning(f'generate goal aborted: {answer.error}')
            return result
