"""
The ``vlm_node`` lifecycle node.

configure checks parameters and model files; activate creates the runtime sessions and
starts taking work; deactivate cancels in-flight work within a bounded time and frees the
sessions; cleanup drops the rest. Work from every source (the local file, topics, the
``~/query`` service) goes through one bounded queue to one worker, because the model already
uses every core.
"""

import gc
import os
import pathlib
import sys
import threading

import rclpy
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.lifecycle import Node, State, TransitionCallbackReturn
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String
from vlm_ros.engine.datatypes import FINISH_CANCELLED, FINISH_ERROR
from vlm_ros.engine.errors import VlmError
from vlm_ros.engine.families.base import ImageOptions
from vlm_ros.ros import image_conversion, model_loader, params
from vlm_ros.ros.request_queue import Busy, Closed, Job, RequestQueue
from vlm_ros_interfaces.msg import Result as ResultMsg
from vlm_ros_interfaces.srv import Query

IMAGE_SUFFIXES = {'.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff', '.pgm', '.ppm'}
DEACTIVATE_GRACE_S = 5.0


class Answer:
    """What the worker hands back for one request."""

    def __init__(self, result=None, error='', finish_reason=FINISH_ERROR, text=''):
        self.result = result
        self.error = error
        self.finish_reason = result.finish_reason if result is not None else finish_reason
        self.text = result.text if result is not None else text

    @property
    def success(self):
        """Tell whether the model answered (to completion, a stop, or its token limit)."""
        return not self.error


class VlmNode(Node):
    """Answers questions about images; runtime sessions exist only while active."""

    def __init__(self, **kwargs):
        super().__init__('vlm_node', **kwargs)
        params.declare_all(self)
        self.cfg = None
        self.choice = None
        self.pipeline = None
        self.exit_code = None
        self._active = threading.Event()
        self._frame_lock = threading.Lock()
        self._latest_frame = None
        self._subs = []
        self._pubs_ready = False
        self.queue = RequestQueue(self.get_parameter('queue_size').value)
        # The service exists in every state so callers get a clear answer, not a timeout.
        self._service_group = ReentrantCallbackGroup()
        self.create_service(Query, '~/query', self._on_query,
                            callback_group=self._service_group)

    # Lifecycle -------------------------------------------------------------------------
    def on_configure(self, state: State) -> TransitionCallbackReturn:
        try:
            cfg = params.read_all(self)
            choice = model_loader.choose_model(cfg)
            if cfg['feed_type'] == params.FEED_FILE:
                self._file_list(cfg)
        except (ValueError, VlmError, OSError) as exc:
            self.get_logger().error(f'configure failed: {exc}')
            return TransitionCallbackReturn.FAILURE
        self.cfg, self.choice = cfg, choice
        self.queue.capacity = cfg['queue_size']
        self.result_pub = self.create_lifecycle_publisher(String, 'result', 10)
        self.detail_pub = self.create_lifecycle_publisher(ResultMsg, 'result_detail', 10)
        if cfg['feed_type'] == params.FEED_TOPICS:
            group = MutuallyExclusiveCallbackGroup()
            self._subs = [
                self.create_subscription(Image, 'image', self._on_frame,
                                         qos_profile_sensor_data, callback_group=group),
                self.create_subscription(CompressedImage, 'image/compressed', self._on_frame,
                                         qos_profile_sensor_data, callback_group=group),
                self.create_subscription(String, 'prompt', self._on_prompt, 10,
                                         callback_group=group),
            ]
        self.get_logger().info(f'configured: {choice.describe()}')
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: State) -> TransitionCallbackReturn:
        try:
            self.pipeline = model_loader.load_pipeline(self.choice, self.cfg)
        except (VlmError, OSError, ValueError) as exc:
            self.get_logger().error(f'activate failed: cannot create sessions: {exc}')
            return TransitionCallbackReturn.FAILURE
        if isinstance(self.choice, model_loader.RemoteChoice):
            detail = f'remote client for {self.choice.url}'
        else:
            detail = (f'{self.choice.runtime}, {self.cfg["n_threads"] or os.cpu_count()} '
                      'threads')
        self.get_logger().info(f'sessions created ({detail})')
        if self.choice.label:
            self.get_logger().warning(f'the loaded model is {self.choice.label}')
        self._active.set()
        self.queue.start()
        ret = super().on_activate(state)
        if self.cfg['feed_type'] == params.FEED_FILE:
            threading.Thread(target=self._answer_files, daemon=True).start()
        return ret

    def on_deactivate(self, state: State) -> TransitionCallbackReturn:
        self._stop_work()
        return super().on_deactivate(state)

    def on_cleanup(self, state: State) -> TransitionCallbackReturn:
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: State) -> TransitionCallbackReturn:
        self._stop_work()
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: State) -> TransitionCallbackReturn:
        self._stop_work()
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def _stop_work(self):
        if not self._active.is_set() and self.pipeline is None:
            return
        self._active.clear()
        if not self.queue.close(DEACTIVATE_GRACE_S):
            self.get_logger().warning(
                f'a request did not stop within {DEACTIVATE_GRACE_S} s of deactivation')
        pipeline, self.pipeline = self.pipeline, None
        if pipeline is not None:
            pipeline.close()  # sessions or HTTP client; queue.close cancelled any request
        gc.collect()  # runtime sessions hold large buffers: free them now, not later
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
        self.cfg = self.choice = None

    # Work ------------------------------------------------------------------------------
    def _settings(self, overrides=None):
        """
        Merge generation settings for one request: current parameters, then the request's.

        Read per request, so `ros2 param set` on these applies to the next answer; model
        parameters apply at the next configure.
        """
        value = self._param
        settings = {name: value(name) for name in (
            'max_new_tokens', 'temperature', 'top_k', 'top_p', 'repetition_penalty',
            'num_beams')}
        settings['seed'] = value('seed') if value('seed') >= 0 else None
        settings.update({k: v for k, v in (overrides or {}).items() if v is not None})
        settings['image_options'] = ImageOptions(value('do_image_splitting'),
                                                 value('max_image_tiles'))
        return settings

    def _param(self, name):
        return self.get_parameter(name).value

    def _run(self, image_source, prompt, system_prompt='', overrides=None):
        """Build the job that answers one request on the worker thread."""
        pipeline = self.pipeline
        settings = self._settings(overrides)

        def run(job):
            if job.should_stop():
                return Answer(error='cancelled before it started: '
                              + ('timed out in the queue' if job.timed_out()
                                 else 'node deactivated'), finish_reason=FINISH_CANCELLED)
            try:
                image = image_source() if callable(image_source) else image_source
                result = pipeline.generate(image, prompt, system_prompt,
                                           should_stop=job.should_stop, **settings)
            except VlmError as exc:
                return Answer(error=str(exc))
            except Exception as exc:  # keep serving whatever a runtime throws
                self.get_logger().error(f'request failed: {type(exc).__name__}: {exc}')
                return Answer(error=f'internal error: {type(exc).__name__}: {exc}')
            if result.finish_reason == FINISH_CANCELLED:
                why = (f'timed out after {self.cfg["request_timeout_s"]} s' if job.timed_out()
                       else 'cancelled: node deactivated')
                return Answer(result=result, error=why)
            return Answer(result=result)
        return Job(run, self.cfg['request_timeout_s'] if self.cfg else 0.0)

    def _submit(self, job):
        """Queue a job; returns an Answer right away when it cannot be queued."""
        if not self._active.is_set():
            return Answer(error='node is not active (lifecycle state must be active)')
        try:
            self.queue.submit(job)
        except Busy:
            return Answer(error=f'busy: {self.queue.capacity} requests already held '
                          '(queue_size)')
        except Closed:
            return Answer(error='node is not active (lifecycle state must be active)')
        return None

    def _wait(self, job):
        timeout = self.cfg['request_timeout_s'] if self.cfg else 0.0
        # The worker notices its deadline between tokens; the margin covers one slow step.
        finished = job.wait(timeout + DEACTIVATE_GRACE_S + 5.0 if timeout > 0 else None)
        if not finished:
            job.cancelled.set()
            return Answer(error='timed out waiting for the model', finish_reason=FINISH_CANCELLED)
        if job.error is not None:
            if isinstance(job.error, Closed):
                return Answer(error='cancelled: node deactivated', finish_reason=FINISH_CANCELLED)
            return Answer(error=f'internal error: {job.error}')
        return job.result

    # Service ---------------------------------------------------------------------------
    def _on_query(self, request, response):
        answer = self._answer_query(request)
        response.success = answer.success
        response.text = answer.text
        response.error = answer.error
        response.finish_reason = answer.finish_reason
        if answer.result is not None:
            r = answer.result
            t = r.timings
            response.prompt_tokens = r.prompt_tokens
            response.completion_tokens = r.completion_tokens
            response.preprocess_ms = t.preprocess_ms
            response.vision_ms = t.vision_ms
            response.prefill_ms = t.prefill_ms
            response.decode_ms = t.decode_ms
            response.total_ms = t.total_ms
        if not answer.success:
            self.get_logger().warning(f'query failed: {answer.error}')
        return response

    def _answer_query(self, request):
        if not self._active.is_set() or self.cfg is None:
            return Answer(error='node is not active (lifecycle state must be active)')
        if image_conversion.has_data(request.image):
            msg = request.image

            def source():
                return image_conversion.image_msg_to_array(msg)
        elif image_conversion.has_data(request.compressed_image):
            msg = request.compressed_image

            def source():
                return image_conversion.compressed_msg_to_array(msg)
        else:
            with self._frame_lock:
                frame = self._latest_frame
            if frame is None:
                return Answer(error='the request has no image and no camera frame has arrived'
                              + ('' if self.cfg['feed_type'] == params.FEED_TOPICS else
                                 ' (feed_type 0 does not subscribe to images)'))

            def source():
                return _frame_to_array(frame)
        overrides = {
            'max_new_tokens': request.max_new_tokens if request.max_new_tokens > 0 else None,
            'temperature': request.temperature if request.temperature >= 0 else None,
            'top_p': request.top_p if 0 < request.top_p <= 1 else None,
            'top_k': request.top_k if request.top_k > 0 else None,
            'seed': request.seed if request.seed >= 0 else None,
            'repetition_penalty': (request.repetition_penalty
                                   if request.repetition_penalty > 0 else None),
        }
        job = self._run(source, request.prompt or self._param('user_prompt'),
                        request.system_prompt or self._param('system_prompt'), overrides)
        refused = self._submit(job)
        return refused if refused is not None else self._wait(job)

    # Topics ----------------------------------------------------------------------------
    def _on_frame(self, msg):
        # Keep only the newest frame, undecoded: a burst costs nothing and never queues.
        with self._frame_lock:
            self._latest_frame = msg

    def _on_prompt(self, msg):
        with self._frame_lock:
            frame = self._latest_frame
        if frame is None:
            self.get_logger().warning('prompt received before any image; ignored')
            return
        if not self._active.is_set():
            self.get_logger().warning('prompt received while not active; ignored')
            return
        job = self._run(lambda: _frame_to_array(frame), msg.data, self._param('system_prompt'))
        refused = self._submit(job)
        if refused is not None:
            self.get_logger().warning(f'prompt dropped: {refused.error}')
            self._publish(msg.data, refused, frame.header)
            return
        threading.Thread(target=lambda: self._publish(msg.data, self._wait(job), frame.header),
                         daemon=True).start()

    def _publish(self, prompt, answer, header=None, log=False):
        if self.cfg is None:
            return
        if answer.success:
            self.result_pub.publish(String(data=answer.text))
        detail = ResultMsg(prompt=prompt, text=answer.text, finish_reason=answer.finish_reason)
        if header is not None:
            detail.header = header
        if answer.result is not None:
            r, t = answer.result, answer.result.timings
            detail.prompt_tokens, detail.completion_tokens = r.prompt_tokens, r.completion_tokens
            detail.preprocess_ms, detail.vision_ms = t.preprocess_ms, t.vision_ms
            detail.prefill_ms, detail.decode_ms, detail.total_ms = (t.prefill_ms, t.decode_ms,
                                                                    t.total_ms)
        if not answer.success:
            detail.text = answer.error
        self.detail_pub.publish(detail)

    # feed_type 0 -----------------------------------------------------------------------
    def _file_list(self, cfg):
        path = cfg['image'] or str(model_loader.share_dir() / 'samples' / 'scene.png')
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
            job = self._run(str(path), cfg['user_prompt'], cfg['system_prompt'])
            refused = self._submit(job)
            answer = refused if refused is not None else self._wait(job)
            if answer.success:
                self.get_logger().info(f'{path.name}: {answer.text}')
                if cfg['one_shot']:
                    print(answer.text, flush=True)
            else:
                failures += 1
                self.get_logger().error(f'{path.name}: {answer.error}')
            self._publish(cfg['user_prompt'], answer)
        if cfg['one_shot']:
            self.exit_code = 1 if failures else 0
            if failures:
                self.get_logger().error(f'{failures} of {len(files)} images failed')
            rclpy.try_shutdown(context=self.context)


def _frame_to_array(msg):
    if isinstance(msg, CompressedImage):
        return image_conversion.compressed_msg_to_array(msg)
    return image_conversion.image_msg_to_array(msg)


def main(args=None):
    """Run the node until shutdown (``ros2 run vlm_ros vlm_node --ros-args ...``)."""
    rclpy.init(args=args)
    try:
        node = VlmNode()
    except ValueError as exc:
        print(f'vlm_node: {exc}', file=sys.stderr)
        rclpy.try_shutdown()
        return 2
    # Service callers wait on a thread each: enough threads for a full queue plus spares so
    # that callers beyond it are told "busy" at once.
    executor = MultiThreadedExecutor(num_threads=node.queue.capacity + 3)
    executor.add_node(node)
    try:
        if node.get_parameter('autostart').value:
            if node.trigger_configure() == TransitionCallbackReturn.SUCCESS:
                node.trigger_activate()
            elif node.get_parameter('one_shot').value:
                node.exit_code = 1
                raise ExternalShutdownException()
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.queue.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
    return node.exit_code or 0


if __name__ == '__main__':
    sys.exit(main())
