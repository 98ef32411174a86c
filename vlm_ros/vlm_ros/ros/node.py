"""
The ``vlm_node`` lifecycle node: a thin ROS adapter over the engine's ``Answerer``.

configure resolves the model (files checked, nothing loaded); activate builds the runtime
sessions (or a remote client) from that spec and starts taking work; deactivate cancels
in-flight work within a bounded time and frees the sessions; cleanup drops the rest. Work
from every source (the local file, topics, the ``~/query`` service) goes through one bounded
queue to one worker, because the model already uses every core. Message conversions live in
``messages``; parameters in ``params``.
"""

import contextlib
import faulthandler
import gc
import logging
import os
import pathlib
import signal
import sys
import threading
import time

from diagnostic_msgs.msg import DiagnosticArray
import rclpy
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.lifecycle import Node, State, TransitionCallbackReturn
from rclpy.qos import qos_profile_sensor_data, QoSProfile, ReliabilityPolicy
from rclpy.signals import SignalHandlerOptions
from rclpy.task import Future
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String
from vlm_ros.engine import grounding, memory
from vlm_ros.engine.datatypes import FINISH_CANCELLED, ImageOptions
from vlm_ros.engine.errors import RemoteUnreachableError, VlmError
from vlm_ros.engine.fallback import FallbackAnswerer
from vlm_ros.engine.families import registry
from vlm_ros.engine.loader import build
from vlm_ros.engine.model_spec import resolve, resolve_remote
from vlm_ros.ros import diagnostics, messages, params
from vlm_ros.ros.generate_action import GenerateAction
from vlm_ros.ros.messages import Answer, NOT_ACTIVE
from vlm_ros.ros.request_queue import Busy, Cancelled, Closed, Job, RequestQueue
from vlm_ros_interfaces.msg import Detection2DArray, Result as ResultMsg
from vlm_ros_interfaces.srv import Detect, Query

IMAGE_SUFFIXES = {'.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff', '.pgm', '.ppm'}
DEACTIVATE_GRACE_S = 5.0
SHUTDOWN_GRACE_S = 3.0
DRAIN_QUIET_S = 0.3
"""At shutdown, how long no request may be in flight before the executor stops."""
# Requests DDS keeps for the service and prompts for the subscription until an executor
# thread takes them: deep enough for every caller a burst can bring, so none is dropped
# unseen; callers beyond queue_size are then answered "busy" at once.
REQUEST_QOS = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE)
EXECUTOR_THREADS = 4
RESULT_DEPTH = 100


def share_dir() -> pathlib.Path:
    """Return the installed share/vlm_ros folder (bundled model, sample image, configs)."""
    from ament_index_python.packages import get_package_share_directory
    return pathlib.Path(get_package_share_directory('vlm_ros'))


class VlmNode(Node):
    """Answers questions about images; runtime sessions exist only while active."""

    def __init__(self, exit_event: threading.Event = None, **kwargs):
        super().__init__('vlm_node', **kwargs)
        params.declare_all(self)
        self.cfg = None
        self.spec = None
        self.fallback_spec = None
        self.answerer = None
        self.stats = diagnostics.RequestStats()
        self._state = 'unconfigured'
        self._activation_error = ''
        self.exit_code = None
        self._exit_event = exit_event or threading.Event()
        self._active = threading.Event()
        self._stop_reason = 'node deactivated'
        self._frame_lock = threading.Lock()
        self._latest_frame = None
        self._subs = []
        self._in_flight = 0
        self._in_flight_lock = threading.Condition()
        self.queue = RequestQueue(self.get_parameter('queue_size').value)
        # The service and the action exist in every state so callers get a clear answer (or
        # a rejection), not a timeout.
        self.create_service(Query, '~/query', self._on_query, qos_profile=REQUEST_QOS,
                            callback_group=ReentrantCallbackGroup())
        self.create_service(Detect, '~/detect', self._on_detect, qos_profile=REQUEST_QOS,
                            callback_group=ReentrantCallbackGroup())
        self.generate_action = GenerateAction(self, REQUEST_QOS)
        # Health on /diagnostics in every state (an absolute name, as diagnostic tools expect).
        period = self.get_parameter('diagnostics_period_s').value
        if period > 0:
            self._diagnostics_pub = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
            self.create_timer(period, self._publish_diagnostics)

    # Lifecycle -------------------------------------------------------------------------
    def on_configure(self, state: State) -> TransitionCallbackReturn:
        """
        Check parameters and resolve the model files or server (nothing is loaded).

        SUCCESS: unconfigured -> inactive. FAILURE (bad parameter, missing or mismatched
        file, bad server settings; logged with the reason): stays unconfigured. An exception
        leads to ErrorProcessing, then ``on_error``.
        """
        try:
            cfg = params.read_all(self)
            spec = self._resolve(cfg)
            fallback = None
            if spec.is_remote and cfg['remote_fallback'] == 'local':
                fallback = self._resolve(dict(cfg, backend='local'))
            if cfg['feed_type'] == params.FEED_FILE:
                self._file_list(cfg)
        except (ValueError, VlmError, OSError) as exc:
            self.get_logger().error(f'configure failed: {exc}')
            return TransitionCallbackReturn.FAILURE
        self.cfg, self.spec, self.fallback_spec = cfg, spec, fallback
        self.queue.capacity = cfg['queue_size']
        # Deep enough that a burst of prompts, each answered or reported, loses no report.
        self.result_pub = self.create_lifecycle_publisher(String, 'result', RESULT_DEPTH)
        self.detail_pub = self.create_lifecycle_publisher(ResultMsg, 'result_detail',
                                                          RESULT_DEPTH)
        if cfg['feed_type'] == params.FEED_TOPICS:
            self.detections_pub = self.create_lifecycle_publisher(
                Detection2DArray, 'detections', RESULT_DEPTH)
            # Drawn only while someone subscribes (rqt_image_view, RViz). Reliable: viewers
            # that subscribe best-effort and reliably can both take it.
            self.annotated_pub = self.create_lifecycle_publisher(
                Image, 'detections/image', QoSProfile(
                    depth=2, reliability=ReliabilityPolicy.RELIABLE))
            group = MutuallyExclusiveCallbackGroup()
            self._subs = [
                self.create_subscription(Image, 'image', self._on_frame,
                                         qos_profile_sensor_data, callback_group=group),
                self.create_subscription(CompressedImage, 'image/compressed', self._on_frame,
                                         qos_profile_sensor_data, callback_group=group),
                self.create_subscription(String, 'prompt', self._on_prompt, REQUEST_QOS,
                                         callback_group=group),
            ]
        self.get_logger().info(f'configured: {spec.describe()}')
        if fallback is not None:
            self.get_logger().info(f'fallback while the server is unreachable: '
                                   f'{fallback.describe()}')
        self._state = 'inactive'
        return TransitionCallbackReturn.SUCCESS

    def _resolve(self, cfg):
        if cfg['backend'] == 'remote':
            return resolve_remote(
                cfg['remote_url'], cfg['remote_model'], cfg['remote_api_key_env'],
                connect_timeout_s=cfg['remote_connect_timeout_s'],
                read_timeout_s=cfg['remote_read_timeout_s'],
                max_retries=cfg['remote_max_retries'],
                image_max_side=cfg['remote_image_max_side'], box_format=cfg['box_format'],
                image_format=cfg['remote_image_format'])
        share = share_dir()
        return resolve(cfg['model_dir'] or None, vision_model=cfg['model_file_name'] or None,
                       decoder_model=cfg['llm_model_name'] or None,
                       model_type=registry.by_param(cfg['model_type']).info.key,
                       base_dir=share, default_dir=share / 'models' / 'default',
                       roles=('model_file_name', 'llm_model_name'))

    def on_activate(self, state: State) -> TransitionCallbackReturn:
        """
        Build the runtime sessions (or the remote client) and start taking work.

        SUCCESS: inactive -> active. FAILURE (sessions cannot be created; logged): stays
        inactive. An exception leads to ErrorProcessing, then ``on_error``.
        """
        cfg = self.cfg
        options = {'n_threads': cfg['n_threads'], 'n_ctx': cfg['n_ctx'],
                   'max_beams': max(4, cfg['num_beams']),
                   'feature_cache_mb': cfg['feature_cache_mb'],
                   'kv_cache_slots': cfg['kv_cache_slots'], 'n_gpu_layers': cfg['n_gpu_layers'],
                   'max_concurrent': cfg['max_concurrent'],
                   'providers': list(cfg['onnx_providers'])}
        try:
            answerer = build(self.spec, **options)
            if self.fallback_spec is not None:
                answerer = FallbackAnswerer(answerer, build(self.fallback_spec, **options))
        except (VlmError, OSError, ValueError) as exc:
            self._activation_error = f'cannot create sessions: {exc}'
            self.get_logger().error(f'activate failed: {self._activation_error}')
            return TransitionCallbackReturn.FAILURE
        self.answerer = answerer
        self._activation_error = ''
        if self.spec.is_remote:
            detail = f'remote client for {self.spec.remote.url}'
        else:
            detail = (f'{self.spec.decoder_runtime}, '
                      f'{self.cfg["n_threads"] or os.cpu_count()} threads')
        concurrency = getattr(answerer, 'max_concurrent', 1)
        if concurrency > 1:
            detail += f', {concurrency} requests at once'
        self.queue.set_concurrency(concurrency)
        self.get_logger().info(f'sessions created ({detail})')
        if self.spec.label:
            self.get_logger().warning(f'the loaded model is {self.spec.label}')
        self._active.set()
        self.queue.start()
        self._state = 'active'
        ret = super().on_activate(state)
        if self.cfg['feed_type'] == params.FEED_FILE:
            threading.Thread(target=self._answer_files, daemon=True).start()
        return ret

    def on_deactivate(self, state: State) -> TransitionCallbackReturn:
        """
        Stop taking work, cancel queued and running requests, free the sessions.

        SUCCESS: active -> inactive (always: a request that does not stop within the grace
        period is logged, its sessions are dropped anyway).
        """
        self._stop_work('node deactivated')
        self._state = 'inactive'
        return super().on_deactivate(state)

    def on_cleanup(self, state: State) -> TransitionCallbackReturn:
        """Drop publishers, subscriptions and the configuration. SUCCESS: -> unconfigured."""
        self._release()
        self._state = 'unconfigured'
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: State) -> TransitionCallbackReturn:
        """Cancel work and free everything. SUCCESS: any primary state -> finalized."""
        self._stop_work('node shutting down')
        self._release()
        self._state = 'finalized'
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: State) -> TransitionCallbackReturn:
        """After an exception in a transition: free everything. SUCCESS: -> unconfigured."""
        self._stop_work('node error')
        self._release()
        self._state = 'unconfigured'
        return TransitionCallbackReturn.SUCCESS

    def _stop_work(self, reason, grace_s=DEACTIVATE_GRACE_S):
        if not self._active.is_set() and self.answerer is None:
            return
        self._stop_reason = reason
        self._active.clear()
        if not self.queue.close(grace_s):
            self.get_logger().warning(f'a request did not stop within {grace_s} s ({reason})')
        answerer, self.answerer = self.answerer, None
        if answerer is not None:
            answerer.close()  # sessions or HTTP client; queue.close cancelled any request
        gc.collect()  # runtime sessions hold large buffers: free them now, not later
        memory.trim()  # and hand them back to the system
        self.get_logger().info('sessions released')

    def _release(self):
        for sub in self._subs:
            self.destroy_subscription(sub)
        self._subs = []
        if self.cfg is not None:
            self.destroy_lifecycle_publisher(self.result_pub)
            self.destroy_lifecycle_publisher(self.detail_pub)
        with self._frame_lock:
            self._latest_frame = None
        self.cfg = self.spec = self.fallback_spec = None

    def shutdown_requests(self, grace_s=SHUTDOWN_GRACE_S):
        """
        Process shutdown: cancel running and queued requests and let their callers' replies go.

        Returns True once every service or action callback in progress has returned its
        (cancelled) reply, False when one is still waiting after ``grace_s`` (a runtime call
        that did not return: the process must then leave without tearing ROS down under it).
        """
        deadline = time.monotonic() + grace_s
        self._stop_work('node shutting down', grace_s)
        # The executor still runs: a request delivered before the signal but not yet taken is
        # taken now and refused at once, counted in flight meanwhile; a callback that returned
        # has its reply sent by the executor thread right after. So wait until nothing has
        # been in flight for DRAIN_QUIET_S, not just for the count to reach zero once.
        with self._in_flight_lock:
            quiet_since = None
            while True:
                now = time.monotonic()
                if now >= deadline:
                    break
                if self._in_flight:
                    quiet_since = None
                    self._in_flight_lock.wait(deadline - now)
                    continue
                quiet_since = quiet_since or now
                if now - quiet_since >= DRAIN_QUIET_S:
                    break
                self._in_flight_lock.wait(min(DRAIN_QUIET_S - (now - quiet_since),
                                              deadline - now))
            done = self._in_flight == 0
        return done and not self.queue.worker_busy()

    # Work ------------------------------------------------------------------------------
    def _settings(self, overrides=None):
        """
        Merge the generation settings of one request: parameters, then the request's.

        Read per request, so `ros2 param set` on these applies to the next answer; model
        parameters apply at the next configure.
        """
        value = self.param
        settings = {name: value(name) for name in (
            'max_new_tokens', 'temperature', 'top_k', 'top_p', 'repetition_penalty',
            'num_beams')}
        settings['seed'] = value('seed') if value('seed') >= 0 else None
        settings.update(overrides or {})
        settings['image_options'] = ImageOptions(value('do_image_splitting'),
                                                 value('max_image_tiles'))
        return settings

    def param(self, name):
        """Return a parameter's current value."""
        return self.get_parameter(name).value

    def is_active(self):
        """Whether the node takes work (lifecycle state active)."""
        return self._active.is_set()

    @contextlib.contextmanager
    def in_flight(self):
        """Count a service or action callback that waits for an answer (see shutdown)."""
        with self._in_flight_lock:
            self._in_flight += 1
        try:
            yield
        finally:
            with self._in_flight_lock:
                self._in_flight -= 1
                self._in_flight_lock.notify_all()

    def make_job(self, image_source, prompt, system_prompt='', overrides=None, on_done=None,
                 history=(), progress=None, questions=None):
        """
        Build the job that answers one request on the worker thread.

        ``image_source`` is called there (decoding is work, not the caller's thread's);
        ``progress`` holds ``on_text`` / ``on_phase`` / ``on_token`` callbacks.
        ``questions``: ``(label, question)`` pairs asked in turn instead of ``prompt``
        (``~/detect``), their answers merged.
        """
        answerer = self.answerer
        settings = self._settings(overrides)
        timeout_s = self.cfg['request_timeout_s']

        def run(job):
            if job.should_stop():
                why = 'timed out in the queue' if job.timed_out() else self._stop_reason
                return Answer(error=f'cancelled before it started: {why}',
                              finish_reason=FINISH_CANCELLED)
            try:
                images = image_source() if callable(image_source) else image_source
                kwargs = dict(history=history, should_stop=job.should_stop,
                              **(progress or {}), **settings)
                if questions is None:
                    result = answerer.generate(images, prompt, system_prompt, **kwargs)
                else:
                    result = grounding.detect(answerer, images, questions, system_prompt,
                                              **kwargs)
            except RemoteUnreachableError as exc:
                return self._counted(Answer(error=str(exc)), unreachable=str(exc))
            except VlmError as exc:
                return self._counted(Answer(error=str(exc)))
            except Exception as exc:  # keep serving whatever a runtime throws
                self.get_logger().error(f'request failed: {type(exc).__name__}: {exc}')
                return self._counted(Answer(error=f'internal error: {type(exc).__name__}: '
                                                  f'{exc}'))
            if result.finish_reason == FINISH_CANCELLED:
                why = (f'timed out after {timeout_s} s' if job.timed_out()
                       else 'cancelled by the caller' if self.is_active()
                       else f'cancelled: {self._stop_reason}')
                return Answer(result=result, error=why)
            return self._counted(Answer(result=result),
                                 getattr(answerer, 'last_unreachable', ''))
        return Job(run, timeout_s, on_done)

    def _counted(self, answer, unreachable=''):
        self.stats.record(answer, unreachable)
        return answer

    def _submit(self, job):
        """Queue a job; returns an Answer right away when it cannot be queued."""
        try:
            if not self._active.is_set():
                raise Closed()
            self.queue.submit(job)
        except Busy:
            self.stats.refuse()
            return Answer(error=f'busy: {self.queue.capacity} requests already held '
                          '(queue_size)')
        except Closed:
            self.stats.refuse()
            return Answer(error=NOT_ACTIVE)
        return None

    def _outcome(self, job):
        """Return the Answer of a finished job."""
        if job.error is not None:
            if isinstance(job.error, Cancelled):
                return Answer(error='cancelled before it started (by the caller)',
                              finish_reason=FINISH_CANCELLED)
            if isinstance(job.error, Closed):
                return Answer(error=f'cancelled: {self._stop_reason}',
                              finish_reason=FINISH_CANCELLED)
            return Answer(error=f'internal error: {job.error}')
        return job.result

    def answer_future(self):
        """Return a ``JobFuture``: an awaitable of a job's Answer for an async callback."""
        return JobFuture(self)

    def wait_for(self, job):
        """Block until ``job`` ends (its deadline plus a margin at most); return its Answer."""
        timeout = job.deadline - time.monotonic() if job.deadline is not None else None
        # The worker notices its deadline between tokens; the margin covers one slow step.
        if not job.wait(None if timeout is None else timeout + DEACTIVATE_GRACE_S + 5.0):
            job.cancelled.set()
            return Answer(error='timed out waiting for the model', finish_reason=FINISH_CANCELLED)
        return self._outcome(job)

    # Diagnostics -----------------------------------------------------------------------
    def _publish_diagnostics(self):
        spec = self.spec
        text = '-' if spec is None else spec.describe()
        if spec is not None and self.fallback_spec is not None:
            text += f'; fallback: {self.fallback_spec.describe()}'
        status = diagnostics.status(self.get_fully_qualified_name(), self._state, text,
                                    self.queue.depth(), self.stats, self._activation_error,
                                    self.param('diagnostics_failures_warn'))
        self._diagnostics_pub.publish(
            diagnostics.array(self.get_clock().now().to_msg(), [status]))

    # Service ---------------------------------------------------------------------------
    async def _on_query(self, request, response):
        return await self._serve(self._answer_query, request, response, 'query')

    async def _on_detect(self, request, response):
        return await self._serve(self._answer_detect, request, response, 'detect')

    async def _serve(self, answer, request, response, what):
        """
        Answer one service call: ``answer(request)`` -> (Answer, image header or None).

        A coroutine: while the model answers no executor thread waits for it, so a few
        threads take every request and each caller beyond the queue is told "busy" at once,
        however many are waiting.
        """
        with self.in_flight():
            if not self._active.is_set() or self.cfg is None:
                self.stats.refuse()
                result, header = Answer(error=NOT_ACTIVE), None
            else:
                result, header = await answer(request)
            messages.fill_result(response, result, header=header)
            if not result.success:
                self.get_logger().warning(f'{what} failed: {result.error}')
            return response

    async def _answer_query(self, request):
        """Return (Answer, header of the image asked about or None)."""
        try:
            overrides = messages.generation_overrides(request)
            prompt = messages.check_prompt(request.prompt) or self.param('user_prompt')
            system = messages.check_prompt(request.system_prompt, 'system_prompt') or \
                self.param('system_prompt')
            source = self.images_source(*self._request_images(request))
        except VlmError as exc:
            return Answer(error=str(exc)), None
        return await self._run(self.make_job(source, prompt, system, overrides)), \
            source.header

    async def _run(self, job):
        """Queue ``job`` and await its Answer (a refusal at once)."""
        done = self.answer_future()
        job.on_done = done.set_job
        refused = self._submit(job)
        if refused is not None:
            return refused
        done.watch(job)
        return await done.future

    @staticmethod
    def _request_images(request):
        """Return ([image], []) or ([], [compressed_image]) or ([], []) of a request."""
        images = [request.image] if messages.has_data(request.image) else []
        compressed = [request.compressed_image] if not images and \
            messages.has_data(request.compressed_image) else []
        return images, compressed

    async def _answer_detect(self, request):
        """Return (Answer, header of the image searched or None)."""
        try:
            labels = [messages.check_prompt(label, 'labels') for label in request.labels]
            prompt = messages.check_prompt(request.prompt)
            questions = self.detect_questions(labels, prompt)
            source = self.images_source(*self._request_images(request))
        except (VlmError, ValueError) as exc:
            return Answer(error=str(exc)), None
        job = self.make_job(source, '', self.param('system_prompt'), questions=questions)
        return await self._run(job), source.header

    def detect_questions(self, labels, prompt):
        """
        Return the ``(label, question)`` pairs to ask for ``labels``, or the free ``prompt``.

        The question comes from the detect_prompt parameter, else the model family's
        grounding question, else (remote backend) the one for its box_format.
        """
        labels = [label.strip() for label in labels if label.strip()]
        if prompt.strip():
            if labels:
                raise messages.RequestError('give labels or a prompt, not both')
            return [('', prompt)]
        if not labels:
            raise messages.RequestError('labels (or a prompt) are required')
        template = self.param('detect_prompt')
        if not template and self.spec.is_remote:
            template = grounding.JSON_PROMPT if self.cfg['box_format'] == grounding.ABSOLUTE \
                else grounding.INTERNVL_PROMPT
        if not template:
            # The loaded checkpoint's own declaration (one family may answer differently
            # per checkpoint, e.g. Qwen2-VL and Qwen2.5-VL), else the family's.
            info = getattr(getattr(self.answerer, 'family', None), 'info', None) or \
                registry.by_key(self.spec.family).info
            try:
                template = grounding.family_template(info)
            except VlmError as exc:
                raise messages.RequestError(
                    f'{exc}: set the detect_prompt parameter or ask with a prompt') from exc
        return grounding.prompts(template, labels)

    def images_source(self, images, compressed):
        """
        Return what the worker decodes: the given images, or the newest camera frame.

        Raw images first, then compressed ones; none at all: the newest frame. More than
        ``max_images`` raise, as does asking for a frame before one arrived.
        """
        msgs = list(images) + list(compressed)
        limit = self.param('max_images')
        if len(msgs) > limit:
            raise VlmError(f'{len(msgs)} images in one request; max_images allows {limit}')
        if msgs:
            return Frames(msgs)
        with self._frame_lock:
            frame = self._latest_frame
        if frame is None:
            raise VlmError('the request has no image and no camera frame has arrived'
                           + ('' if self.cfg['feed_type'] == params.FEED_TOPICS else
                              ' (feed_type 0 does not subscribe to images)'))
        return Frames([frame])

    # Topics ----------------------------------------------------------------------------
    def _on_frame(self, msg):
        # Keep only the newest frame, undecoded: a burst costs nothing and never queues.
        with self._frame_lock:
            self._latest_frame = msg

    def _on_prompt(self, msg):
        with self._frame_lock:
            frame = self._latest_frame
        header = frame.header if frame is not None else None
        try:
            prompt = messages.check_prompt(msg.data)
            if frame is None:
                raise VlmError('no camera frame has arrived yet')
        except VlmError as exc:
            self._report_dropped(msg.data, Answer(error=str(exc)), header)
            return
        source = Frames([frame])
        job = self.make_job(source, prompt, self.param('system_prompt'),
                            on_done=lambda job: self._publish(msg.data, self._outcome(job),
                                                              header, source))
        refused = self._submit(job)
        if refused is not None:
            self._report_dropped(msg.data, refused, header)

    def _report_dropped(self, prompt, answer, header):
        self.get_logger().warning(f'prompt dropped: {answer.error}')
        self._publish(prompt, Answer(error=f'prompt dropped: {answer.error}',
                                     finish_reason=answer.finish_reason), header)

    def _publish(self, prompt, answer, header=None, source=None):
        cfg = self.cfg
        if cfg is None:
            return
        if answer.success:
            self.result_pub.publish(String(data=answer.text))
        detail = messages.fill_result(ResultMsg(prompt=prompt), answer, header=header)
        if header is not None:
            detail.header = header
        self.detail_pub.publish(detail)
        if cfg['feed_type'] == params.FEED_TOPICS and header is not None and answer.success:
            # Every answer about a camera frame, boxes or none: a consumer sees "nothing
            # found" as an empty array rather than silence.
            self.detections_pub.publish(detail.detections)
            if source is not None and source.arrays and \
                    self.annotated_pub.get_subscription_count() > 0:
                self.annotated_pub.publish(messages.annotated_image(
                    source.arrays[0], answer.result.detections, header))

    # feed_type 0 -----------------------------------------------------------------------
    def _file_list(self, cfg):
        path = cfg['image'] or str(share_dir() / 'samples' / 'scene.png')
        path = pathlib.Path(os.path.expanduser(path))
        if cfg['image_type'] == 0:
            if not path.is_file():
                raise VlmError(f'image file not found: {path}')
            return [path]
        if not path.is_dir():
            raise VlmError(f'image folder not found: {path}')
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise VlmError(f'no image files in {path}')
        return files

    def _answer_files(self):
        cfg = self.cfg
        failures = 0
        files = self._file_list(cfg)
        for path in files:
            job = self.make_job(str(path), cfg['user_prompt'], cfg['system_prompt'])
            refused = self._submit(job)
            answer = refused if refused is not None else self.wait_for(job)
            if answer.success:
                self.get_logger().info(f'{path.name}: {answer.text}')
                if cfg['one_shot']:
                    print(answer.text, flush=True)
            else:
                failures += 1
                self.get_logger().error(f'{path.name}: {answer.error}')
            self._publish(cfg['user_prompt'], answer)
        if cfg['one_shot']:
            if failures:
                self.get_logger().error(f'{failures} of {len(files)} images failed')
            self.exit_code = 1 if failures else 0
            self._exit_event.set()


class Frames:
    """
    The image messages of one request, decoded when called (on the worker thread).

    ``header`` is the first image's (what detections are stamped with); ``arrays`` keeps the
    decoded images for drawing the detections.
    """

    def __init__(self, msgs):
        self.msgs = msgs
        self.header = msgs[0].header
        self.arrays = []

    def __call__(self):
        self.arrays = [_frame_to_array(m) for m in self.msgs]
        return self.arrays


class JobFuture:
    """
    An rclpy Future that a job's end completes with its Answer, from the worker thread.

    A done callback makes ``set_result`` wake the executor (it schedules the callback as a
    task), so the coroutine awaiting ``future`` resumes at once. Like ``wait_for``, a caller
    is answered "timed out" once the job's deadline plus a margin passes, even if one model
    step never returns.
    """

    def __init__(self, node):
        self._node = node
        self._lock = threading.Lock()
        self._timer = None
        self.future = Future(executor=node.executor)
        self.future.add_done_callback(lambda _future: None)

    def set_job(self, job):
        """Complete the future with ``job``'s Answer (a Job's ``on_done``)."""
        self._settle(self._node._outcome(job))

    def watch(self, job):
        """Start the deadline backstop for ``job`` (none when it has no deadline)."""
        if job.deadline is None:
            return
        delay = job.deadline - time.monotonic() + DEACTIVATE_GRACE_S + 5.0

        def expire():
            job.cancelled.set()
            self._settle(Answer(error='timed out waiting for the model',
                                finish_reason=FINISH_CANCELLED))
        self._timer = threading.Timer(max(0.0, delay), expire)
        self._timer.daemon = True
        self._timer.start()

    def _settle(self, answer):
        with self._lock:
            if self.future.done():
                return
            self.future.set_result(answer)
        if self._timer is not None:
            self._timer.cancel()


def _frame_to_array(msg):
    if isinstance(msg, CompressedImage):
        return messages.compressed_to_array(msg)
    return messages.image_to_array(msg)


def _spin(executor, exit_event):
    """Spin until the executor is shut down; any failure ends the process, cleanly."""
    try:
        executor.spin()
    except ExternalShutdownException:
        pass
    except Exception as exc:  # noqa: B902 -- e.g. a context torn down by another thread
        print(f'vlm_node: executor stopped: {type(exc).__name__}: {exc}', file=sys.stderr)
    finally:
        exit_event.set()


def main(args=None):
    """
    Run the node until SIGINT / SIGTERM (``ros2 run vlm_ros vlm_node --ros-args ...``).

    rclpy's own signal handlers would shut the context down at once, and with it the
    service, before a running request could be answered. Here a signal only sets an event:
    the main thread then cancels running and queued requests, lets their "cancelled" replies
    go, shuts the executor down and exits 0. A second signal exits at once.
    """
    exit_event = threading.Event()

    def on_signal(signum, _frame):
        if exit_event.is_set():
            os._exit(128 + signum)
        exit_event.set()

    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    # `kill -USR1 <pid>` prints every thread's stack to stderr: what a stuck node is doing.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        node = VlmNode(exit_event)
    except ValueError as exc:
        print(f'vlm_node: {exc}', file=sys.stderr)
        rclpy.try_shutdown()
        return 2
    # Callers of the service and the action wait in coroutines, not on threads: a few threads
    # serve the service, the action, the lifecycle services, topics and diagnostics.
    executor = MultiThreadedExecutor(num_threads=EXECUTOR_THREADS)
    executor.add_node(node)
    spinner = threading.Thread(target=_spin, args=(executor, exit_event), daemon=True)
    spinner.start()
    if node.get_parameter('autostart').value and not exit_event.is_set():
        if node.trigger_configure() == TransitionCallbackReturn.SUCCESS:
            node.trigger_activate()
        elif node.get_parameter('one_shot').value:
            node.exit_code = 1
            exit_event.set()
    while not exit_event.wait(0.5):
        pass
    code = node.exit_code or 0
    if not node.shutdown_requests():
        # A runtime call that did not return within the grace period: leave now, without
        # destroying the executor, the node or the native buffers under it.
        node.get_logger().warning('a request was still running at shutdown; exiting now')
        _leave(code)
    executor.shutdown(timeout_sec=SHUTDOWN_GRACE_S)
    spinner.join(SHUTDOWN_GRACE_S)
    node.generate_action.destroy()
    node.queue.shutdown(grace_s=1.0)
    node.destroy_node()
    rclpy.try_shutdown()
    executor.context.destroy()  # finalizes rcl and the DDS participant now, not at exit
    # Everything ROS is down; leaving without the interpreter's own teardown keeps native
    # libraries' static destructors (DDS, ONNX Runtime, llama.cpp) from racing threads they
    # still own: seen as "terminate called without an active exception" (SIGABRT) at exit.
    _leave(code)


def _leave(code):
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == '__main__':
    sys.exit(main())
