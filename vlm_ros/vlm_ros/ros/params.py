"""
The node's parameters: one table of names, defaults, descriptions and limits.

Names follow the existing RDK VLM node (``feed_type``, ``model_type``, ``model_file_name``,
``llm_model_name``, ...) so its users can move over with their launch files.
"""

from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

from rcl_interfaces.msg import (FloatingPointRange, IntegerRange, ParameterDescriptor,
                                SetParametersResult)
from rclpy.exceptions import InvalidParameterTypeException

FEED_FILE = 0
FEED_TOPICS = 1
MODEL_INTERNVL = 0
MODEL_SMOLVLM = 1
BACKENDS = ('local', 'remote')


@dataclass(frozen=True)
class Spec:
    """One declared parameter."""

    name: str
    default: Any
    description: str
    bounds: Optional[Tuple[float, float]] = None
    choices: Optional[Sequence[Any]] = None
    additional: str = ''

    def descriptor(self):
        """Build the ParameterDescriptor that ``ros2 param describe`` shows."""
        desc = ParameterDescriptor(name=self.name, description=self.description,
                                   additional_constraints=self.additional)
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
         'empty = the bundled sample image.'),
    Spec('image_type', 0, '0: `image` is one file; 1: a folder answered in name order.',
         choices=(0, 1)),
    Spec('user_prompt', 'Describe this image.', 'Prompt for feed_type 0 and for service calls '
         'with an empty prompt.'),
    Spec('system_prompt', '', 'System message put before the user turn; empty = none.'),
    # Which model.
    Spec('backend', 'local', 'local: run the model here; remote: send requests to an '
         'OpenAI-compatible server.', choices=BACKENDS),
    Spec('model_type', MODEL_SMOLVLM, '0: InternVL2.5/3; 1: SmolVLM/SmolVLM2.',
         choices=(MODEL_INTERNVL, MODEL_SMOLVLM)),
    Spec('model_file_name', '', 'Vision encoder: an ONNX file or an mmproj GGUF. Relative '
         'paths resolve against model_dir. Empty = the embedded default model.'),
    Spec('llm_model_name', '', 'Language model: a .gguf file runs in llama.cpp, an ONNX decoder '
         'in ONNX Runtime. Relative paths resolve against model_dir.'),
    Spec('model_dir', '', 'Folder with tokenizer and config files; relative model paths '
         'resolve against it. Empty = the folder of model_file_name, or the embedded default.'),
    Spec('n_threads', 0, 'CPU threads for the runtimes; 0 = all cores.', bounds=(0, 256)),
    Spec('n_ctx', 0, "llama.cpp context length; 0 = the model's trained context.",
         bounds=(0, 1 << 20)),
    # Latency knobs for the image.
    Spec('do_image_splitting', False, 'Split large images into tiles plus a global view: '
         'more detail, one image_seq_len block of tokens per tile.'),
    Spec('max_image_tiles', 0, "Cap on image tiles when splitting; 0 = the model's own limit.",
         bounds=(0, 64)),
    # Generation defaults (a Query request may override them).
    Spec('max_new_tokens', 256, 'Most tokens generated per answer.', bounds=(1, 32768)),
    Spec('temperature', 0.0, 'Sampling temperature; 0 = greedy.', bounds=(0.0, 100.0)),
    Spec('top_k', 0, 'Sample among the k most likely tokens; 0 = off.', bounds=(0, 100000)),
    Spec('top_p', 1.0, 'Nucleus sampling mass; 1 = off.', bounds=(0.0, 1.0)),
    Spec('repetition_penalty', 1.0, 'Penalty on tokens already present; 1 = none.',
         bounds=(0.01, 100.0)),
    Spec('seed', -1, 'Sampling seed; -1 = a new seed per request.', bounds=(-1, 2**31 - 1)),
    Spec('num_beams', 1, 'Beam width; 1 = no beam search.', bounds=(1, 16)),
    # Node behaviour.
    Spec('autostart', True, 'Configure and activate by itself; false leaves the lifecycle to '
         'a manager.'),
    Spec('one_shot', False, 'feed_type 0: exit after the last answer (0 on success).'),
    Spec('queue_size', 4, 'Requests held at once, the one being answered included; more '
         'are refused at once as busy.', bounds=(1, 1024)),
    Spec('request_timeout_s', 120.0, 'Longest a request may run before it is cancelled; '
         '0 = no limit.', bounds=(0.0, 86400.0)),
    # Remote backend.
    Spec('remote_url', '', 'Base URL of the OpenAI-compatible server, e.g. '
         'http://gpu-host:8000/v1.'),
    Spec('remote_model', '', 'Model name sent to the server.'),
    Spec('remote_api_key_env', '', 'Name of the environment variable holding the API key '
         '(the key itself never goes into a parameter).'),
    Spec('remote_connect_timeout_s', 5.0, 'Connect timeout for the remote server.',
         bounds=(0.1, 600.0)),
    Spec('remote_read_timeout_s', 60.0, 'Longest wait for the next bytes from the server.',
         bounds=(0.1, 3600.0)),
    Spec('remote_max_retries', 2, 'Retries on connection errors only.', bounds=(0, 10)),
    Spec('remote_image_max_side', 1024, 'Longest image side sent to the server, in pixels.',
         bounds=(16, 8192)),
)

SPEC_BY_NAME: Dict[str, Spec] = {s.name: s for s in SPECS}


def declare_all(node):
    """Declare every parameter on ``node`` and reject invalid values on later sets."""
    for spec in SPECS:
        try:
            node.declare_parameter(spec.name, spec.default, spec.descriptor())
        except InvalidParameterTypeException as exc:
            kind = {bool: 'a boolean', int: 'an integer', float: 'a double', str: 'a string'}[
                type(spec.default)]
            raise ValueError(f'parameter {spec.name} must be {kind} '
                             f'(e.g. {spec.name}:={spec.default!r}): {exc}') from None
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
    if problems:
        raise ValueError('; '.join(problems))
    return values
