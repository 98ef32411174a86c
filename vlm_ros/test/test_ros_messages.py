"""The node's message module, in-process: images, request overrides and result fields."""

import io
import math
import re
import struct
import time
import zlib

import numpy as np
from PIL import Image as PilImage
import pytest
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header
from vlm_ros.engine import images
from vlm_ros.engine.datatypes import Box, Result, Timings
from vlm_ros.engine.errors import ImageError
from vlm_ros.ros import messages
from vlm_ros.ros.messages import Answer, RequestError
from vlm_ros_interfaces.action import Generate
from vlm_ros_interfaces.msg import Result as ResultMsg
from vlm_ros_interfaces.srv import Detect, Query


def _rgb(seed=0, h=5, w=7):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _msg(array, encoding, pad=0, big_endian=False):
    h, w = array.shape[:2]
    data = array.astype(array.dtype.newbyteorder('>' if big_endian else '<')).tobytes()
    row = len(data) // h
    rows = np.zeros((h, row + pad), np.uint8)
    rows[:, :row] = np.frombuffer(data, np.uint8).reshape(h, row)
    return Image(height=h, width=w, encoding=encoding, step=row + pad,
                 is_bigendian=int(big_endian), data=rows.tobytes())


# (encoding, how to make the message's array from RGB / grey test data, the same pixels as
# an array the engine reads directly)
def _cases():
    rgb = _rgb()
    alpha = np.random.default_rng(1).integers(0, 256, rgb.shape[:2], dtype=np.uint8)
    rgba = np.dstack([rgb, alpha])
    grey = rgb[..., 0]
    grey16 = np.random.default_rng(2).integers(0, 65536, grey.shape, dtype=np.uint16)
    grey16[0, 0], grey16[0, 1] = 65534, 65535
    return [
        ('rgb8', rgb, rgb), ('bgr8', rgb[..., ::-1], rgb), ('8UC3', rgb[..., ::-1], rgb),
        ('rgba8', rgba, rgba), ('bgra8', rgba[..., [2, 1, 0, 3]], rgba),
        ('mono8', grey, grey), ('8UC1', grey, grey),
        ('mono16', grey16, grey16), ('16UC1', grey16, grey16),
    ]


@pytest.mark.parametrize('pad', [0, 3])
@pytest.mark.parametrize('encoding,data,same', _cases(), ids=[c[0] for c in _cases()])
def test_every_encoding_gives_the_engines_array(encoding, data, same, pad):
    """The ROS path and the library path agree on every pixel, padded rows included."""
    expected = images.to_rgb(np.ascontiguousarray(same))
    for big in ((False, True) if data.dtype == np.uint16 else (False,)):
        got = messages.image_to_array(_msg(np.ascontiguousarray(data), encoding, pad, big))
        assert got.dtype == np.uint8 and got.shape == expected.shape
        assert np.array_equal(got, expected), (encoding, pad, big)


def test_sixteen_bit_scaling_is_the_engines():
    values = np.array([[0, 257, 65534, 65535]], dtype=np.uint16)
    got = messages.image_to_array(_msg(values, 'mono16'))[..., 0]
    assert got.tolist() == [[0, 1, 255, 255]]


@pytest.mark.parametrize('make,expected', [
    (lambda: Image(height=10, width=10, encoding='rgb8', step=30, data=bytes(299)),
     'expected height*step'),
    (lambda: Image(height=2, width=2, encoding='yuv422', step=4, data=bytes(8)),
     'unsupported image encoding'),
    (lambda: Image(height=0, width=4, encoding='rgb8', step=12, data=bytes(1)), 'is empty'),
    (lambda: Image(height=1, width=100000, encoding='mono8', step=100000, data=bytes(1)),
     'a side over'),
    (lambda: Image(height=2, width=4, encoding='rgb8', step=6, data=bytes(12)),
     'shorter than'),
])
def test_malformed_image_messages(make, expected):
    with pytest.raises(ImageError, match=re.escape(expected)):
        messages.image_to_array(make())


def _encoded(fmt, array=None):
    buffer = io.BytesIO()
    PilImage.fromarray(_rgb(3) if array is None else array).save(buffer, fmt)
    return buffer.getvalue()


def _png_header_only(width, height):
    """Build a PNG whose header claims ``width`` x ``height`` over a few zero rows of data."""
    def chunk(kind, body):
        return struct.pack('>I', len(body)) + kind + body + \
            struct.pack('>I', zlib.crc32(kind + body) & 0xffffffff)
    ihdr = struct.pack('>IIBBBBB', width, height, 8, 0, 0, 0, 0)
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr)
            + chunk(b'IDAT', zlib.compress(bytes((width + 1) * 4))) + chunk(b'IEND', b''))


def test_compressed_jpeg_and_png_decode_like_the_engine():
    for fmt, label in (('PNG', 'png'), ('JPEG', 'jpeg'), ('PNG', 'rgb8; png compressed rgb8'),
                       ('JPEG', '')):
        data = _encoded(fmt)
        got = messages.compressed_to_array(CompressedImage(format=label, data=data))
        assert np.array_equal(got, images.to_rgb(data))


def test_compressed_formats_other_than_jpeg_png_need_their_name():
    bmp = _encoded('BMP')
    with pytest.raises(ImageError, match='accepted: JPEG, PNG'):
        messages.compressed_to_array(CompressedImage(format='png', data=bmp))
    got = messages.compressed_to_array(CompressedImage(format='bmp', data=bmp))
    assert np.array_equal(got, _rgb(3))
    with pytest.raises(ImageError, match='not an image'):
        messages.compressed_to_array(CompressedImage(format='png', data=b'hello world'))


@pytest.mark.parametrize('side', [12000, 20000, 40000])
def test_decompression_bomb_refused_from_its_header(side):
    """A few hundred bytes claiming a huge image: refused before a pixel is decoded."""
    bomb = _png_header_only(side, side)
    assert len(bomb) < 2000
    start = time.perf_counter()
    with pytest.raises(ImageError, match='too large|megapixels|a side over'):
        messages.compressed_to_array(CompressedImage(format='png', data=bomb))
    assert time.perf_counter() - start < 0.1


def test_error_texts_never_quote_file_contents():
    secret = b'root:x:0:0:secret-line\n' * 10
    with pytest.raises(ImageError) as err:
        messages.compressed_to_array(CompressedImage(format='png', data=secret))
    assert 'root' not in str(err.value) and 'secret' not in str(err.value)


def test_overrides_defaults_mean_use_the_parameter():
    assert messages.generation_overrides(Query.Request()) == {}
    request = Query.Request(max_new_tokens=5, temperature=0.5, top_p=0.9, top_k=3, seed=0,
                            repetition_penalty=1.2)
    overrides = messages.generation_overrides(request)
    assert overrides['max_new_tokens'] == 5 and overrides['top_k'] == 3
    assert overrides['seed'] == 0
    assert math.isclose(overrides['temperature'], 0.5)
    assert math.isclose(overrides['top_p'], 0.9, rel_tol=1e-6)
    assert math.isclose(overrides['repetition_penalty'], 1.2, rel_tol=1e-6)


@pytest.mark.parametrize('field,value,expected', [
    ('temperature', math.inf, 'temperature must be a finite number in [0, 100]'),
    ('temperature', 1e9, 'temperature must be in [0, 100]'),
    ('temperature', -0.5, 'temperature must be in [0, 100]'),
    ('temperature', math.nan, 'temperature is NaN'),
    ('repetition_penalty', math.inf, 'repetition_penalty must be a finite number'),
    ('repetition_penalty', 1e-30, 'repetition_penalty must be in [0.01, 100]'),
    ('top_p', 1.5, 'top_p must be in (0, 1]'),
    ('top_p', math.nan, 'top_p is NaN'),
    ('max_new_tokens', -1, 'max_new_tokens must be in [1, 32768]'),
    ('max_new_tokens', 10**6, 'max_new_tokens must be in [1, 32768]'),
    ('top_k', -2, 'top_k must be in [0, 100000]'),
    ('seed', -7, 'seed must be in'),
])
def test_out_of_range_overrides_name_field_and_range(field, value, expected):
    with pytest.raises(RequestError, match=re.escape(expected)):
        messages.generation_overrides(Query.Request(**{field: value}))


def test_prompts_with_nul_are_refused():
    with pytest.raises(RequestError, match='NUL'):
        messages.check_prompt('what is\x00 this')
    assert messages.check_prompt('plain ünïcode ✓') == 'plain ünïcode ✓'


def test_fill_result_for_service_and_topic_messages():
    timings = Timings(1.0, 2.0, 3.0, 4.0, 10.0)
    answer = Answer(Result('a red square', 'stop', [1, 2, 3], 20, 8, timings))
    response = messages.fill_result(Query.Response(), answer)
    assert response.success and response.error == '' and response.text == 'a red square'
    assert (response.prompt_tokens, response.completion_tokens) == (20, 3)
    assert (response.preprocess_ms, response.vision_ms, response.prefill_ms,
            response.decode_ms, response.total_ms) == (1.0, 2.0, 3.0, 4.0, 10.0)
    detail = messages.fill_result(ResultMsg(prompt='q'), answer)
    assert detail.text == 'a red square' and detail.finish_reason == 'stop'
    failed = Answer(error='busy: 2 requests already held (queue_size)')
    response = messages.fill_result(Query.Response(), failed)
    assert not response.success and response.error.startswith('busy')
    assert response.text == '' and response.finish_reason == 'error'
    assert messages.fill_result(ResultMsg(), failed).text.startswith('busy')


def test_detections_fill_every_answer_message_with_the_image_header():
    header = Header(frame_id='camera_optical')
    header.stamp.sec = 12
    result = Result('<ref>cup</ref><box>[[0,0,500,500]]</box>', 'stop', [1], 20)
    result.detections = [Box('cup', 10.0, 20.0, 50.0, 100.0, 0.75)]
    for target in (Query.Response(), Detect.Response(), ResultMsg(), Generate.Result()):
        messages.fill_result(target, Answer(result), header=header)
        array = target.detections
        assert array.header.frame_id == 'camera_optical' and array.header.stamp.sec == 12
        [d] = array.detections
        assert (d.label, d.score, d.center_x, d.center_y, d.size_x, d.size_y) == \
            ('cup', 0.75, 30.0, 60.0, 40.0, 80.0)
    response = messages.fill_result(Detect.Response(), Answer(error='no frame'), header=header)
    assert not response.success and response.error == 'no frame'
    assert response.detections.detections == []


def test_annotated_image_draws_the_boxes_on_the_original_pixels():
    rgb = np.full((60, 80, 3), 200, np.uint8)
    header = Header(frame_id='camera')
    msg = messages.annotated_image(rgb, [Box('a', 10, 10, 40, 30)], header)
    assert (msg.width, msg.height, msg.encoding, msg.step) == (80, 60, 'rgb8', 240)
    assert msg.header.frame_id == 'camera'
    drawn = np.frombuffer(bytes(msg.data), np.uint8).reshape(60, 80, 3)
    assert (drawn[10, 25] == (255, 0, 255)).all() and (drawn[50, 70] == 200).all()
    assert (rgb == 200).all()  # the caller's frame is not drawn on


def test_answers_with_a_nul_cross_ros_whole():
    """A NUL a model wrote would cut the ROS string there: the node drops it, and only it."""
    from rclpy.serialization import deserialize_message, serialize_message
    box = Box('cup\x00', 1.0, 2.0, 3.0, 4.0)
    result = Result(text='a\x00b\x00c', finish_reason='stop', token_ids=[1, 2],
                    prompt_tokens=5, timings=Timings(1, 2, 3, 4, 10), detections=[box],
                    backend='local')
    response = messages.fill_result(Query.Response(), Answer(result=result))
    sent = deserialize_message(serialize_message(response), Query.Response)
    assert sent.text == 'abc'
    assert [d.label for d in sent.detections.detections] == ['cup']
