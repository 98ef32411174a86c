"""
The node's parameters: one table of names, defaults, descriptions and limits.

Names follow the existing RDK VLM node (``feed_type``, ``model_type``, ``model_file_name``,
``llm_model_name``, ...) so its users can move over with their launch files. The
``model_type`` values come from the family registry and the generation limits from the
engine, so the node accepts exactly what the library does. Parameters that choose which
files are read, where requests are sent or which secret is used are read-only: set at launch
(``--ros-args`` / YAML), refused by ``ros2 param set``.
"""

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

from rcl_interfaces.msg import (FloatingPointRange, IntegerRange, ParameterDescriptor,
                                SetParametersResult)
from rclpy.exceptions import (InvalidParameterTypeException, InvalidParameterValueException,
                              ParameterAlreadyDeclaredException)
from vlm_ros.engine import grounding
from vlm_ros.engine.datatypes import GENERATION_LIMITS, Limit
from vlm_ros.engine.families import registry

FEED_FILE = 0
FEED_TOPICS = 1
BACKENDS = ('local', 'remote')
FALLBACKS = ('none', 'local')


def _template_problem(template) -> Optional[str]:
    if template and '{label}' not in template and '{labels}' not in template:
        return "a grounding question needs '{label}' or '{labels}'"
    return None


DEFAULT_MODEL_TYPE = registry.default().info.model_type_param


@dataclass(frozen=True)
class Spec:
    """One declared parameter."""

    name: str
    default: Any
    description: str
    bounds: Optional[Tuple[float, float]] = None
    choices: Optional[Sequence[Any]] = None
    additional: str = ''
    read_only: bool = False
    limit: Optional[Limit] = None
    """An engine limit checked instead of ``bounds`` (which then come from it)."""
    accepts: Optional[Callable[[Any], Optional[str]]] = None
    """A further check: returns why a value is not acceptable, or None."""

    def __post_init__(self):
        if self.limit is not None and self.bounds is None:
            object.__setattr__(self, 'bounds', (self.limit.low, self.limit.high))

    def descriptor(self):
        """Build the ParameterDescriptor that ``ros2 param describe`` shows."""
        desc = ParameterDescriptor(name=self.name, description=self.description,
                                   additional_constraints=self.additional,
                                   read_only=self.read_only)
        if self.bounds is not None:
            low, high = self.bounds
            if isinstance(self.default, bool):
                pass
            elif isinstance(self.default, int):
                desc.integer_range = [IntegerRange(from_value=int(low), to_value=int(high),
                                                   step=0)]
            elif isinstance(self.default, float):
                desc.floating_point_range = [FloatingPointRange(
                    from_value=float(low), to_value=float(high), step=0.0)]
        if self.choices is not None and not desc.additional_constraints:
            desc.additional_constraints = 'one of: ' + ', '.join(map(str, self.choices))
        return desc

    def check(self, value) -> Optional[str]:
        """Return why ``value`` is not acceptable, or None."""
        if self.choices is not None and value not in self.choices:
            return f'{self.name} must be one of {list(self.choices)}, got {value!r}'
        if self.accepts is not None and self.accepts(value):
            return f'{self.name}: {self.accepts(value)}'
        if self.limit is not None:
            return self.limit.check(self.name, value)
        if self.bounds is not None and not isinstance(value, bool):
            low, high = self.bounds
            if not low <= value <= high:
                return f'{self.name} must be in [{low}, {high}], got {value!r}'
        return None


SPECS = (
    # What to answer.
    Spec('feed_type', FEED_FILE, '0: answer a local image file or folder; 1: subscribe to '
         'image and prompt topics.', choices=(FEED_FILE, FEED_TOPICS)),
    Spec('image', '', 'feed_type 0: image file (image_type 0) or folder (image_type 1); '
         'empty = the bundled sample image.', read_only=True),
    Spec('image_type', 0, '0: `image` is one file; 1: a folder answered in name order.',
         choices=(0, 1), read_only=True),
    Spec('user_prompt', 'Describe this image.', 'Prompt for feed_type 0 and for service calls '
         'with an empty prompt.'),
    Spec('system_prompt', '', 'System message put before the user turn; empty = none.'),
    Spec('detect_prompt', '', '~/detect question: {label} is asked once per label, {labels} '
         "once for all; empty = the model family's grounding question (backend remote: "
         "InternVL's for box_format normalized_1000, a JSON one for absolute).",
         accepts=_template_problem),
    # Which model.
    Spec('backend', 'local', 'local: run the model here; remote: send requests to an '
         'OpenAI-compatible server.', choices=BACKENDS, read_only=True),
    Spec('model_type', DEFAULT_MODEL_TYPE, registry.param_help() + '.',
         choices=tuple(i.model_type_param for i in registry.infos()), read_only=True),
    Spec('model_file_name', '', 'Vision encoder: an ONNX file or an mmproj GGUF. Relative '
         'paths resolve against model_dir. Empty = the embedded default model.',
         read_only=True),
    Spec('llm_model_name', '', 'Language model: a .gguf file runs in llama.cpp, an ONNX decoder '
         'in ONNX Runtime. Relative paths resolve against model_dir.', read_only=True),
    Spec('model_dir', '', 'Folder with tokenizer and config files; relative model paths '
         'resolve against it. Empty = the folder of model_file_name, or the embedded default.',
         read_only=True),
    Spec('n_threads', 0, 'CPU threads for the runtimes; 0 = all cores.', bounds=(0, 256)),
    Spec('n_ctx', 0, "llama.cpp context length; 0 = the model's trained context.",
         bounds=(0, 1 << 20)),
    Spec('n_gpu_layers', 0, 'llama.cpp layers (and its projector) offloaded to the GPU of a '
         'CUDA / Metal build of llama-cpp-python; 0 = CPU only, -1 = all.',
         bounds=(-1, 100000), read_only=True),
    Spec('onnx_providers', ['CPUExecutionProvider'], 'ONNX Runtime execution providers in '
         'order of preference (e.g. CUDAExecutionProvider, TensorrtExecutionProvider, '
         'CPUExecutionProvider); ones this onnxruntime build lacks are skipped with a warning.',
         read_only=True),
    Spec('feature_cache_mb', 64, 'Image features kept by image content for follow-up '
         'questions (LRU, MiB); 0 = off.', bounds=(0, 65536)),
    Spec('kv_cache_slots', 2, 'Recent sequences whose KV cache is kept so a prompt sharing '
         'their prefix prefills only the rest; 0 = off.', bounds=(0, 64)),
    Spec('max_concurrent', 1, 'Requests a llama.cpp decoder answers at once, their decode '
         'steps batched (continuous batching); each has its own n_ctx of KV cache and keeps '
         'its last prompt for reuse; beam search needs 1. ONNX decoders and servers: one at '
         'a time.', bounds=(1, 64)),
    # Latency knobs for the image.
    Spec('do_image_splitting', False, 'Split large images into tiles plus a global view: '
         'more detail, one image_seq_len block of tokens per tile.'),
    Spec('max_image_tiles', 0, "Cap on image tiles when splitting; 0 = the model's own limit.",
         bounds=(0, 64)),
    # Generation defaults (a Query request may override them).
    Spec('max_new_tokens', 256, 'Most tokens generated per answer.',
         limit=GENERATION_LIMITS['max_new_tokens']),
    Spec('temperature', 0.0, 'Sampling temperature; 0 = greedy.',
         limit=GENERATION_LIMITS['temperature']),
    Spec('top_k', 0, 'Sample among the k most likely tokens; 0 = off.',
         limit=GENERATION_LIMITS['top_k']),
    Spec('top_p', 1.0, 'Nucleus sampling mass in (0, 1]; 1 = off.',
         limit=GENERATION_LIMITS['top_p']),
    Spec('repetition_penalty', 1.0, 'Penalty on tokens already present; 1 = none.',
         limit=GENERATION_LIMITS['repetition_penalty']),
    Spec('seed', -1, 'Sampling seed; -1 = a new seed per request.',
         bounds=(-1, GENERATION_LIMITS['seed'].high)),
    Spec('num_beams', 1, 'Beam width; 1 = no beam search.',
         limit=GENERATION_LIMITS['num_beams']),
    # Node behaviour.
    Spec('autostart', True, 'Configure and activate by itself; false leaves the lifecycle to '
         'a manager.'),
    Spec('one_shot', False, 'feed_type 0: exit after the last answer (0 on success).'),
    Spec('queue_size', 4, 'Requests held at once, the one being answered included; more '
         'are refused at once as busy (action goals: rejected).', bounds=(1, 1024)),
    Spec('max_images', 4, 'Most images in one ~/generate goal.', bounds=(1, 64)),
    Spec('feedback_min_interval_ms', 0, '~/generate feedback at most this often; 0 = every '
         'text delta.', bounds=(0, 60000)),
    Spec('request_timeout_s', 120.0, 'Longest a request may run before it is cancelled; '
         '0 = no limit.', bounds=(0.0, 86400.0)),
    # Remote backend.
    Spec('remote_url', '', 'Base URL of the OpenAI-compatible server, e.g. '
         'http://gpu-host:8000/v1.', read_only=True),
    Spec('remote_model', '', 'Model name sent to the server.', read_only=True),
    Spec('remote_api_key_env', '', 'Name of the environment variable holding the API key '
         '(the key itself never goes into a parameter).', read_only=True),
    Spec('remote_connect_timeout_s', 5.0, 'Connect timeout for the remote server.',
         bounds=(0.1, 600.0)),
    Spec('remote_read_timeout_s', 60.0, 'Longest wait for the next bytes from the server.',
         bounds=(0.1, 3600.0)),
    Spec('remote_max_retries', 2, 'Retries on connection errors only.', bounds=(0, 10)),
    Spec('remote_image_max_side', 1024, 'Longest image side sent to the server, in pixels.',
         bounds=(16, 8192)),
    Spec('remote_image_format', 'jpeg', 'How images are sent to the server: jpeg (quality '
         '90, small) or png (lossless: the server sees the pixels a local model would).',
         choices=('jpeg', 'png'), read_only=True),
    Spec('box_format', 'normalized_1000', 'backend remote: how the served model writes boxes: '
         'normalized_1000 (0-1000 of the image: InternVL, Qwen2-VL) or absolute (pixels of '
         'the image it saw: Qwen2.5-VL, VLM-R1; images are then sent on its resize grid). '
         'Local models declare their own.', choices=grounding.BOX_FORMATS, read_only=True),
    Spec('remote_fallback', 'none', 'backend remote: local = also load the local model and '
         'answer with it while the server cannot be reached; none = report the failure.',
         choices=FALLBACKS, read_only=True),
    # Health.
    Spec('diagnostics_period_s', 1.0, 'Period of the diagnostic_msgs/DiagnosticArray on '
         '/diagnostics; 0 = not published.', bounds=(0.0, 3600.0)),
    Spec('diagnostics_failures_warn', 3, 'Consecutive failed requests that turn the '
         'diagnostic status to WARN.', bounds=(1, 1000000)),
)

SPEC_BY_NAME: Dict[str, Spec] = {s.name: s for s in SPECS}


def declare_all(node):
    """
    Declare every parameter on ``node`` and reject invalid values on later sets.

    Raises ValueError with a message for people when a launch value has the wrong type or
    is out of range (rclpy raises its own exceptions with a traceback's worth of detail).
    """
    for spec in SPECS:
        try:
            node.declare_parameter(spec.name, spec.default, spec.descriptor())
        except InvalidParameterTypeException as exc:
            kind = {bool: 'a boolean', int: 'an integer', float: 'a double', str: 'a string',
                    list: 'a list of strings'}[type(spec.default)]
            raise ValueError(f'parameter {spec.name} must be {kind} '
                             f'(e.g. {spec.name}:={spec.default!r}): {exc}') from None
        except InvalidParameterValueException as exc:
            allowed = spec.limit.text() if spec.limit is not None else \
                '[{:g}, {:g}]'.format(*spec.bounds) if spec.bounds else 'see its description'
            raise ValueError(f'parameter {spec.name} is out of range {allowed}: {exc}') \
                from None
        except ParameterAlreadyDeclaredException:
            continue
    node.add_on_set_parameters_callback(_validate_update)


def _validate_update(params):
    for param in params:
        spec = SPEC_BY_NAME.get(param.name)
        if spec is None:
            continue
        reason = spec.check(param.value)
        if reason:
            return SetParametersResult(successful=False, reason=reason)
    return SetParametersResult(successful=True)


def read_all(node) -> Dict[str, Any]:
    """
    Return every parameter's current value, validated.

    Values given at launch bypass the set callback, so configure re-checks them here.
    """
    values = {s.name: node.get_parameter(s.name).value for s in SPECS}
    problems = [r for r in (SPEC_BY_NAME[k].check(v) for k, v in values.items()) if r]
    if values['max_concurrent'] > 1 and values['num_beams'] > 1:
        problems.append('num_beams > 1 needs max_concurrent 1 (beam search is not batched)')
    if problems:
        raise ValueError('; '.join(problems))
    return values
