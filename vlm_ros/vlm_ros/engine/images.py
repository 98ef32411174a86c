"""
Turning whatever the caller has into an RGB uint8 array, plus resampling helpers.

Colour conversion follows transformers' ``convert_to_rgb`` for a PIL image of the same
content: grey is replicated to three channels, and an image with transparency (an alpha
band, or a palette / grey image with a transparent colour) is alpha-composited onto white
with Pillow. Arrays are converted as the PIL image ``Image.fromarray`` would make of them, so
an RGBA array and the equivalent RGBA PIL image give identical pixels.

Deliberate differences from transformers, where its behaviour loses the picture:

* 16-bit images (uint16 arrays, PIL modes ``I;16*`` and ``I``) are scaled to 8 bit
  (``round(v / 257)``); Pillow's ``convert('RGB')`` would clip everything above 255 to white.
* float arrays in [0, 1] are quantised with rounding (``round(v * 255)``); transformers
  truncates, turning 1/255 into 0.
* encoded files keep their alpha (composited onto white like an in-memory PIL image);
  ``transformers.image_utils.load_image`` drops it with ``convert('RGB')``. Both apply the
  EXIF orientation.

This module is the one image policy of the project: the ROS adapter only reinterprets a
message's bytes as an array and hands it here with its channel order (``from_channels``) or
hands encoded bytes to ``decode`` with the formats it accepts, so bit depth, channel order,
size limits and decoding are the same whether an image comes from a file, the library or a
ROS message.
"""

import io
import os
import pathlib
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vlm_ros.engine import cpu_pool
from vlm_ros.engine.errors import ImageError
from vlm_ros.engine.resize import resize as resize_on_cores

MAX_SIDE = 32768
MAX_PIXELS = 100_000_000
CHANNEL_ORDERS = ('RGB', 'BGR', 'RGBA', 'BGRA', 'L')

# PIL resampling filters by the integer transformers stores in preprocessor_config.json.
RESAMPLE_NAMES = {0: 'nearest', 1: 'lanczos', 2: 'bilinear', 3: 'bicubic', 4: 'box',
                  5: 'hamming'}

_SIXTEEN_BIT_MODES = ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I')


def to_rgb(image) -> np.ndarray:
    """
    Return ``image`` as a C-contiguous RGB uint8 array (H, W, 3).

    Accepted: a numpy array (H, W) or (H, W, 1) grey, (H, W, 3) RGB or (H, W, 4) RGBA of
    dtype uint8, uint16 or float in [0, 1]; a PIL image of any mode (LA, P, CMYK ...); a file
    path (str or os.PathLike); encoded bytes (JPEG, PNG, ... anything Pillow reads). An
    (H, W, 3) uint8 contiguous array is returned as is (no copy).

    Raises ImageError naming the problem: empty, wrong shape or dtype, non-finite or out of
    range values, missing file, undecodable data, or more than MAX_PIXELS / MAX_SIDE.
    """
    if image is None:
        raise ImageError('no image given')
    if isinstance(image, np.ndarray):
        return _from_array(image)
    if isinstance(image, Image.Image):
        return _from_pil(image)
    if isinstance(image, (str, os.PathLike)):
        return _from_file(image)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _decode(bytes(image), 'encoded image', None)
    raise ImageError(f'unsupported image type {type(image).__name__}: pass a numpy array, a '
                     'PIL image, a file path or encoded bytes')


def from_channels(array: np.ndarray, order: str) -> np.ndarray:
    """
    Return an (H, W, C) or (H, W) array whose channels are in ``order`` as RGB uint8.

    ``order`` is one of CHANNEL_ORDERS (``L`` is grey); uint16 values are scaled like any
    other 16-bit image (``round(v / 257)``), alpha is composited onto white.
    """
    if order not in CHANNEL_ORDERS:
        raise ImageError(f'unknown channel order {order!r}; one of {CHANNEL_ORDERS}')
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] != len(order):
        raise ImageError(f'{order} image needs {len(order)} channel(s), got shape '
                         f'{tuple(array.shape)}')
    if order in ('BGR', 'BGRA'):
        array = array[:, :, [2, 1, 0, 3][:len(order)]]
    return _from_array(array)


def decode(data, source='encoded image', formats: Optional[Sequence[str]] = None) -> np.ndarray:
    """
    Decode encoded image bytes (JPEG, PNG, ...) to RGB uint8, the size checked first.

    The dimensions are read from the header and checked against the limits before a pixel
    is decoded, so a small file that would decode to a huge image costs nothing. ``formats``
    (Pillow format names, e.g. ``('JPEG', 'PNG')``) restricts what is accepted; None: any
    format Pillow reads.
    """
    return _decode(bytes(data), source, formats)


def check_size(height, width, source='image'):
    """Raise ImageError when a ``height`` x ``width`` image is empty or absurdly large."""
    if height <= 0 or width <= 0:
        raise ImageError(f'{source} is empty ({width}x{height} pixels)')
    if height > MAX_SIDE or width > MAX_SIDE:
        raise ImageError(f'{source} is {width}x{height} pixels; a side over {MAX_SIDE} is '
                         'not accepted')
    if height * width > MAX_PIXELS:
        raise ImageError(f'{source} has {height * width / 1e6:.1f} megapixels ({width}x'
                         f'{height}); the limit is {MAX_PIXELS / 1e6:.0f} megapixels')


def _from_file(path):
    """Read and decode an image file."""
    path = pathlib.Path(os.path.expanduser(os.fspath(path)))
    if not path.exists():
        raise ImageError(f'image file not found: {path}')
    if not path.is_file():
        raise ImageError(f'image path is not a file: {path}')
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageError(f'cannot read image file {path}: {exc}') from exc
    return _decode(data, f'image file {path}', None)


def _decode(data, source, formats):
    """Decode encoded image bytes with Pillow, applying the EXIF orientation."""
    if not data:
        raise ImageError(f'{source} is empty (0 bytes)')
    try:
        with Image.open(io.BytesIO(data)) as img:
            if formats is not None and img.format not in formats:
                raise ImageError(f'{source} is {img.format or "an unknown format"}; accepted: '
                                 f'{", ".join(formats)}')
            # The header is enough to refuse a decompression bomb before decoding it.
            check_size(img.height, img.width, source)
            img.load()
            img = ImageOps.exif_transpose(img)
    except ImageError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageError(f'{source} is not an image Pillow can read ({len(data)} bytes)') \
            from exc
    except Image.DecompressionBombError as exc:
        raise ImageError(f'{source} is too large: {exc}') from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f'{source} is corrupt or truncated: {exc}') from exc
    return _from_pil(img)


def _from_pil(img):
    """Convert a PIL image as transformers' ``convert_to_rgb`` does (see module docstring)."""
    check_size(img.height, img.width, f'PIL image ({img.mode})')
    if img.mode in _SIXTEEN_BIT_MODES:
        values = np.clip(np.asarray(img, dtype=np.int64), 0, 65535).astype(np.uint16)
        return _from_array(values)
    # LAB's 'A' band is the a* colour axis, not alpha (transformers mistakes it for alpha).
    has_alpha = ('A' in img.getbands() and img.mode != 'LAB') or \
        img.info.get('transparency') is not None
    try:
        if has_alpha:
            rgba = img.convert('RGBA')
            white = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
            rgb = Image.alpha_composite(white, rgba).convert('RGB')
        else:
            rgb = img.convert('RGB')
    except ValueError as exc:
        raise ImageError(f'PIL image mode {img.mode!r} cannot be converted to RGB: {exc}') \
            from exc
    return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))


def _from_array(array):
    """Validate an (H, W[, C]) array and convert it to RGB uint8."""
    shape = tuple(array.shape)
    if array.ndim == 2:
        array = array[:, :, None]
    elif array.ndim != 3:
        raise ImageError(f'image array must be (H, W) or (H, W, C); got {array.ndim} '
                         f'dimensions, shape {shape}')
    height, width, channels = array.shape
    if channels not in (1, 3, 4):
        hint = ('; channel-first (C, H, W) arrays are not accepted, transpose to (H, W, C)'
                if shape[0] in (1, 3, 4) else '')
        raise ImageError(f'image array must have 1 (grey), 3 (RGB) or 4 (RGBA) channels in '
                         f'the last axis; got shape {shape}{hint}')
    check_size(height, width, f'image array of shape {shape}')
    array = _to_uint8(array, shape)
    if channels == 3:
        return np.ascontiguousarray(array)
    if channels == 1:
        return np.ascontiguousarray(np.repeat(array, 3, axis=2))
    if bool(np.all(array[:, :, 3] == 255)):
        # Opaque: compositing onto white leaves the colour unchanged.
        return np.ascontiguousarray(array[:, :, :3])
    return _from_pil(Image.fromarray(np.ascontiguousarray(array)))


def _to_uint8(array, shape):
    """Bring uint8, uint16 or float [0, 1] values to uint8."""
    kind, size = array.dtype.kind, array.dtype.itemsize
    if kind == 'u' and size == 1:
        return array.astype(np.uint8, copy=False)
    if kind == 'u' and size == 2:  # either byte order
        # round(v / 257): 65535 -> 255 and every k * 257 -> k.
        return ((array.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        values = array.astype(np.float32) if array.dtype.itemsize < 4 else array
        finite = np.isfinite(values)
        if not bool(finite.all()):
            raise ImageError(f'float image of shape {shape} has {int(values.size - finite.sum())} '
                             'non-finite values (NaN or inf)')
        low, high = float(values.min()), float(values.max())
        if low < 0.0 or high > 1.0:
            raise ImageError(f'float image values must be in [0, 1]; got [{low:g}, {high:g}] '
                             '(scale it, or pass uint8)')
        return np.rint(values * 255.0).astype(np.uint8)
    raise ImageError(f'unsupported image dtype {array.dtype}: use uint8, uint16 or float '
                     'with values in [0, 1]')


def resize(image: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    """
    Resize an RGB uint8 (H, W, 3) array to ``height`` x ``width`` with Pillow.

    ``resample`` is the PIL filter number transformers stores (1 = LANCZOS, 3 = BICUBIC ...);
    Pillow is what transformers' PIL image processors resize with, so results are identical
    (large images are resized on every core, with the same bytes: see ``resize``).
    """
    if image.shape[:2] == (height, width):
        # Pillow returns an unfiltered copy for a same-size resize; skip the round trip.
        return image
    return resize_on_cores(image, int(height), int(width), int(resample))


def normalize_tables(rescale_factor: float, mean: Sequence[float], std: Sequence[float],
                     do_rescale=True, do_normalize=True) -> np.ndarray:
    """
    Return float32 lookup tables [3, 256] mapping a uint8 value to its model input.

    The arithmetic is transformers' (``rescale``: float64 multiply then float32; ``normalize``:
    float32 ``(x - mean) / std``); applied per element it gives the same floats as running it
    on the whole image, at the cost of a table lookup.
    """
    values = np.arange(256, dtype=np.float64)
    values = (values * rescale_factor).astype(np.float32) if do_rescale else \
        values.astype(np.float32)
    tables = np.empty((3, 256), dtype=np.float32)
    for c in range(3):
        tables[c] = values
        if do_normalize:
            tables[c] = (values - np.float32(mean[c])) / np.float32(std[c])
    return tables


def apply_tables_to_frames(frames, tables: np.ndarray, out: np.ndarray):
    """``apply_tables`` for each frame into ``out[i, :, :h, :w]``, frames spread over cores."""
    def one(i):
        h, w = frames[i].shape[:2]
        apply_tables(frames[i], tables, out=out[i, :, :h, :w])
    cpu_pool.run_all(one, range(len(frames)))


def apply_tables(image: np.ndarray, tables: np.ndarray, out: np.ndarray = None) -> np.ndarray:
    """Map an RGB uint8 (H, W, 3) image through ``tables`` into float32 channels-first."""
    if out is None:
        out = np.empty((3,) + image.shape[:2], dtype=np.float32)
    for c in range(3):
        np.take(tables[c], image[:, :, c], out=out[c])
    return out
