"""
sensor_msgs Image / CompressedImage to numpy arrays the engine accepts.

cv_bridge is used when importable (a Humble robot has it); otherwise an equivalent numpy
path reads the same encodings. Both validate the message first, because a malformed frame
must become an error response, never a crash.
"""

import numpy as np

from vlm_ros.engine.errors import ImageError

# encoding -> (channels, dtype, channel order of the result the engine takes)
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
MAX_SIDE = 16384
MAX_BYTES = 512 * 1024 * 1024

try:  # optional: present on robots with the distribution's ROS 2
    from cv_bridge import CvBridge
except ImportError:  # pragma: no cover - depends on the machine
    CvBridge = None


def validate_image_msg(msg):
    """Raise ImageError if the message's size fields and data disagree or are absurd."""
    if msg.encoding not in ENCODINGS:
        raise ImageError(f'unsupported image encoding {msg.encoding!r}; supported: '
                         f'{", ".join(ENCODINGS)}')
    if msg.height == 0 or msg.width == 0:
        raise ImageError(f'empty image ({msg.width}x{msg.height})')
    if msg.height > MAX_SIDE or msg.width > MAX_SIDE:
        raise ImageError(f'image of {msg.width}x{msg.height} exceeds {MAX_SIDE} pixels a side')
    channels, dtype, _ = ENCODINGS[msg.encoding]
    row = msg.width * channels * np.dtype(dtype).itemsize
    if msg.step < row:
        raise ImageError(f'step {msg.step} is shorter than a {msg.encoding} row of '
                         f'{msg.width} pixels ({row} bytes)')
    if msg.height * msg.step > MAX_BYTES:
        raise ImageError(f'image of {msg.height * msg.step} bytes exceeds {MAX_BYTES}')
    if len(msg.data) != msg.height * msg.step:
        raise ImageError(f'data has {len(msg.data)} bytes, expected height*step = '
                         f'{msg.height}*{msg.step} = {msg.height * msg.step}')


def image_msg_to_array(msg, use_cv_bridge=None):
    """
    Return (H, W, 3|4) uint8 RGB/RGBA or (H, W) uint8 gray for a sensor_msgs/Image.

    mono16 is scaled to 8 bits by its full range (a depth-like camera stream is otherwise
    nearly black at 8 bits).
    """
    validate_image_msg(msg)
    channels, dtype, order = ENCODINGS[msg.encoding]
    if use_cv_bridge is None:
        use_cv_bridge = CvBridge is not None
    if use_cv_bridge:
        if CvBridge is None:
            raise ImageError('cv_bridge is not installed')
        array = CvBridge().imgmsg_to_cv2(msg, desired_encoding='passthrough')
    else:
        itemsize = np.dtype(dtype).itemsize
        buf = np.frombuffer(bytes(msg.data), dtype=np.uint8).reshape(msg.height, msg.step)
        rows = np.ascontiguousarray(buf[:, :msg.width * channels * itemsize])
        big = dtype != np.uint8 and bool(msg.is_bigendian)
        array = rows.view(np.dtype(dtype).newbyteorder('>' if big else '<'))
        array = array.reshape(msg.height, msg.width, channels).astype(dtype)
    return _to_engine_layout(np.asarray(array), channels, order)


def _to_engine_layout(array, channels, order):
    if array.dtype == np.uint16:
        array = (array.astype(np.uint32) * 255 // 65535).astype(np.uint8)
    if channels == 1:
        return array.reshape(array.shape[0], array.shape[1])
    if order == 'BGR':
        return np.ascontiguousarray(array[..., ::-1])
    if order == 'BGRA':
        return np.ascontiguousarray(array[..., [2, 1, 0, 3]])
    return np.ascontiguousarray(array)


def compressed_msg_to_array(msg):
    """Decode a jpeg/png sensor_msgs/CompressedImage to (H, W, 3) RGB uint8."""
    import cv2
    if len(msg.data) == 0:
        raise ImageError('compressed image has no data')
    if len(msg.data) > MAX_BYTES:
        raise ImageError(f'compressed image of {len(msg.data)} bytes exceeds {MAX_BYTES}')
    buf = np.frombuffer(bytes(msg.data), dtype=np.uint8)
    array = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if array is None:
        raise ImageError(f'cannot decode compressed image (format {msg.format!r}, '
                         f'{len(msg.data)} bytes): corrupt or not jpeg/png')
    return np.ascontiguousarray(array[..., ::-1])


def has_data(msg):
    """Whether an Image or CompressedImage field of a request carries a picture."""
    return len(msg.data) > 0
