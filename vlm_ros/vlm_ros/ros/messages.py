"""
Message plumbing, one place for the service, the topics and the action alike.

ROS messages in: ``sensor_msgs`` images become RGB arrays (this module only reinterprets a
message's bytes; bit depth, channel order, size limits and decoding are ``engine.images``'),
request fields become validated generation overrides. Answers out: an ``Answer`` (the
engine's ``Result`` or an error) becomes the fields of a Query response, a ``Result``
message or an action result. Nothing here spins a node, so it is tested in-process.
"""

import math
import re
from typing import Dict, Optional, Sequence

import numpy as np
from sensor_msgs.msg import Image

from vlm_ros.engine import annotate, images
from vlm_ros.engine.datatypes import Box, FINISH_ERROR, GENERATION_LIMITS, Result
from vlm_ros.engine.errors import ImageError, VlmError
from vlm_ros_interfaces.msg import Detection2D, Detection2DArray

# encoding -> (channels, dtype, channel order as engine.images.from_channels reads it)
ENCODINGS = {
    'rgb8': (3, np.uint8, 'RGB'),
    'bgr8': (3, np.uint8, 'BGR'),
    'rgba8': (4, np.uint8, 'RGBA'),
    'bgra8': (4, np.uint8, 'BGRA'),
    'mono8': (1, np.uint8, 'L'),
    '8UC1': (1, np.uint8, 'L'),
    '8UC3': (3, np.uint8, 'BGR'),
    'mono16': (1, np.uint16, 'L'),
    '16UC1': (1, np.uint16, 'L'),
}
# CompressedImage formats: JPEG and PNG always (what image_transport's compressed plugin
# sends); these others only when the message's ``format`` field names them.
COMPRESSED_FORMATS = {'jpeg': 'JPEG', 'jpg': 'JPEG', 'png': 'PNG'}
NAMED_ONLY_FORMATS = {'bmp': 'BMP', 'webp': 'WEBP', 'tiff': 'TIFF', 'tif': 'TIFF'}
MAX_PROMPT_CHARS = 65536
NOT_ACTIVE = 'node is not active (lifecycle state must be active)'


class RequestError(VlmError, ValueError):
    """A request field is out of range or malformed; the message names field and range."""


def ros_text(text: str) -> str:
    """
    Return ``text`` as a ROS 2 string field carries it whole: without NUL characters.

    rosidl strings are C strings, cut at the first NUL on the way out. A model can write
    one (a byte token); the node drops it from every answer and feedback delta alike, so the
    deltas still add up to the answer.
    """
    return text.replace('\x00', '')


class Answer:
    """What the node hands back for one request: the engine's Result, or an error."""

    def __init__(self, result: Optional[Result] = None, error='', finish_reason=FINISH_ERROR,
                 text=''):
        self.result = result
        self.error = error
        self.finish_reason = result.finish_reason if result is not None else finish_reason
        self.text = ros_text(result.text if result is not None else text)

    @property
    def success(self):
        """Tell whether the model answered (to completion, a stop, or its token limit)."""
        return not self.error


# -- images ---------------------------------------------------------------------------------

def has_data(msg) -> bool:
    """Whether an Image or CompressedImage field of a request carries a picture."""
    return len(msg.data) > 0


def image_to_array(msg) -> np.ndarray:
    """Return a ``sensor_msgs/Image`` as RGB uint8, after checking its fields against its data."""
    if msg.encoding not in ENCODINGS:
        raise ImageError(f'unsupported image encoding {msg.encoding!r}; supported: '
                         f'{", ".join(ENCODINGS)}')
    images.check_size(msg.height, msg.width, f'{msg.encoding} image')
    channels, dtype, order = ENCODINGS[msg.encoding]
    itemsize = np.dtype(dtype).itemsize
    row = msg.width * channels * itemsize
    if msg.step < row:
        raise ImageError(f'step {msg.step} is shorter than a {msg.encoding} row of '
                         f'{msg.width} pixels ({row} bytes)')
    if len(msg.data) != msg.height * msg.step:
        raise ImageError(f'data has {len(msg.data)} bytes, expected height*step = '
                         f'{msg.height}*{msg.step} = {msg.height * msg.step}')
    buf = np.frombuffer(memoryview(msg.data), dtype=np.uint8).reshape(msg.height, msg.step)
    rows = np.ascontiguousarray(buf[:, :row])
    big = itemsize > 1 and bool(msg.is_bigendian)
    array = rows.view(np.dtype(dtype).newbyteorder('>' if big else '<'))
    return images.from_channels(array.reshape(msg.height, msg.width, channels), order)


def compressed_formats(format_field: str):
    """Pillow format names a CompressedImage with this ``format`` field may hold."""
    named = set(re.findall(r'[a-z0-9]+', format_field.lower()))
    return sorted({*COMPRESSED_FORMATS.values(),
                   *(NAMED_ONLY_FORMATS[n] for n in named if n in NAMED_ONLY_FORMATS)})


def compressed_to_array(msg) -> np.ndarray:
    """
    Decode a ``sensor_msgs/CompressedImage`` to RGB uint8.

    JPEG and PNG are accepted whatever ``format`` says (image_transport writes e.g.
    ``rgb8; jpeg compressed bgr8``); BMP, WebP and TIFF only when ``format`` names them. The
    size is checked from the header before any pixel is decoded.
    """
    return images.decode(msg.data, f'compressed image (format {msg.format!r})',
                         compressed_formats(msg.format))


# -- requests -------------------------------------------------------------------------------

def check_prompt(text: str, field='prompt') -> str:
    """Return ``text`` when usable as a prompt; RequestError otherwise."""
    if '\x00' in text:
        raise RequestError(f'{field} contains a NUL character (at index {text.index(chr(0))})')
    if len(text) > MAX_PROMPT_CHARS:
        raise RequestError(f'{field} has {len(text)} characters; the limit is '
                           f'{MAX_PROMPT_CHARS}')
    return text


def _override(request, name, default, unset_text):
    """Return the request's ``name`` unless it is the "use the parameter" default."""
    value = getattr(request, name)
    if isinstance(value, float) and math.isnan(value):
        raise RequestError(f'{name} is NaN; {unset_text} uses the node parameter, or give a '
                           f'value in {GENERATION_LIMITS[name].text()}')
    if value == default:
        return None
    reason = GENERATION_LIMITS[name].check(name, value)
    if reason:
        raise RequestError(f'{reason} ({unset_text} uses the node parameter)')
    return value


def generation_overrides(request) -> Dict[str, object]:
    """
    Return the validated generation overrides of a Query request or Generate goal.

    Each field's default means "use the node parameter"; any other value must be in the
    range the parameter accepts, else RequestError names the field and its range.
    """
    overrides = {
        'max_new_tokens': _override(request, 'max_new_tokens', 0, '0'),
        'temperature': _override(request, 'temperature', -1.0, '-1'),
        'top_p': _override(request, 'top_p', 0.0, '0'),
        'top_k': _override(request, 'top_k', 0, '0'),
        'seed': _override(request, 'seed', -1, '-1'),
        'repetition_penalty': _override(request, 'repetition_penalty', 0.0, '0'),
    }
    for name in ('temperature', 'top_p', 'repetition_penalty'):
        if overrides[name] is not None:
            overrides[name] = float(overrides[name])
    stop = list(getattr(request, 'stop', ()) or ())
    if stop:
        if not all(stop):
            raise RequestError('stop strings must not be empty')
        overrides['stop'] = tuple(check_prompt(s, 'stop') for s in stop)
    return {k: v for k, v in overrides.items() if v is not None}


# -- answers --------------------------------------------------------------------------------

def detections_msg(boxes: Sequence[Box], header=None) -> Detection2DArray:
    """Return boxes (original-image pixels) as a Detection2DArray with the image's header."""
    array = Detection2DArray(detections=[
        Detection2D(label=ros_text(b.label), score=float(b.score), center_x=b.center[0],
                    center_y=b.center[1], size_x=b.size[0], size_y=b.size[1])
        for b in boxes])
    if header is not None:
        array.header = header
    return array


def annotated_image(rgb: np.ndarray, boxes: Sequence[Box], header=None) -> Image:
    """Return ``rgb`` with each box and its label drawn, as an rgb8 ``sensor_msgs/Image``."""
    data = annotate.draw_boxes(rgb, boxes)
    msg = Image(height=data.shape[0], width=data.shape[1], encoding='rgb8', is_bigendian=0,
                step=data.shape[1] * 3, data=data.tobytes())
    if header is not None:
        msg.header = header
    return msg


def fill_result(target, answer: Answer, with_status=True, header=None):
    """
    Copy an answer into a Query or Detect response, a Result message or an action result.

    Sets the fields ``target`` has: ``success`` / ``error`` (with ``with_status``), ``text``,
    ``finish_reason``, token counts, per-phase timings and ``detections`` (stamped with
    ``header``, the image's). For a failed answer the Result message, which has no error
    field, carries the error as its text.
    """
    has_error = hasattr(target, 'error')
    if with_status and hasattr(target, 'success'):
        target.success = answer.success
        target.error = answer.error
    target.text = answer.text if (answer.success or has_error) else answer.error
    if hasattr(target, 'finish_reason'):
        target.finish_reason = answer.finish_reason
    if hasattr(target, 'detections'):
        boxes = answer.result.detections if answer.result is not None else ()
        target.detections = detections_msg(boxes, header)
    if answer.result is None or not hasattr(target, 'prompt_tokens'):
        return target
    r, t = answer.result, answer.result.timings
    target.prompt_tokens = r.prompt_tokens
    target.completion_tokens = r.completion_tokens
    target.cached_tokens = r.cached_tokens
    if hasattr(target, 'backend'):
        target.backend = r.backend
    target.preprocess_ms = float(t.preprocess_ms)
    target.vision_ms = float(t.vision_ms)
    target.prefill_ms = float(t.prefill_ms)
    target.decode_ms = float(t.decode_ms)
    target.total_ms = float(t.total_ms)
    return target
