"""
Pillow's resize split across threads, giving the same bytes as one ``Image.resize``.

Pillow resamples in two separable passes on one thread: a horizontal pass, in which each
output row comes from one input row, and a vertical pass, in which each output column comes
from one input column, rounded to 8 bits in between. Run apart, on bands of rows and then on
bands of columns, the passes give the bytes Pillow gives. The bands run on a thread pool
(Pillow releases the GIL while it resamples). SmolVLM's processor resizes a 512 px camera
image up to 2048 px and back down to 512 px with Lanczos; on one thread that costs about
150 ms, and it does not get faster with more cores.

Which pass Pillow runs first depends on its version and on the sizes (recent versions run
the vertical pass first for some reductions). The rule is not documented, so it is learnt
per geometry (sizes and filter) instead: the first resize of a geometry is Pillow's own,
and meanwhile a background task resizes a random image of that geometry with Pillow and in
both orders. The order that gives the same bytes is used from then on. If neither order
does (a Pillow with another algorithm), that geometry stays with Pillow.
"""

import collections
import threading

import numpy as np
from PIL import Image

from vlm_ros.engine import cpu_pool

MIN_PIXELS = 512 * 512
"""Below this many pixels (in or out), threads cost more than they save."""
MAX_GEOMETRIES = 32
"""Geometries whose order of passes is remembered (a camera has one or two)."""

HORIZONTAL_FIRST, VERTICAL_FIRST, PILLOW_ONLY = 'horizontal', 'vertical', 'pillow'

_lock = threading.Lock()
_orders = collections.OrderedDict()
"""(h, w, height, width, resample) -> one of the three orders, or None while learning."""


def resize(image: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    """Resize an RGB uint8 (H, W, 3) array like ``Image.resize`` does, on every core."""
    h, w = image.shape[:2]
    workers = _workers()
    order = None
    if workers > 1 and max(h * w, height * width) >= MIN_PIXELS and image.ndim == 3:
        order = _order((h, w, height, width, resample))
    if order in (None, PILLOW_ONLY):
        return _pillow(image, height, width, resample)
    return _two_passes(image, height, width, resample, order == VERTICAL_FIRST, workers)


def _pillow(image, height, width, resample):
    return np.asarray(Image.fromarray(image).resize((width, height), resample=resample))


def _two_passes(image, height, width, resample, vertical_first, bands):
    out = image
    for horizontal in ((False, True) if vertical_first else (True, False)):
        if horizontal and out.shape[1] != width:
            out = _bands(out, out.shape[0], width, resample, bands, axis=0)
        elif not horizontal and out.shape[0] != height:
            out = _bands(out, height, out.shape[1], resample, bands, axis=1)
    return out


def _bands(image, height, width, resample, workers, axis):
    """
    One pass: resize bands of rows (axis 0, width changes) or of columns (axis 1).

    The bands run on the shared pool; a single band runs on the calling thread.
    """
    size = image.shape[axis]
    edges = [round(i * size / workers) for i in range(workers + 1)]
    out = np.empty((height, width) + image.shape[2:], dtype=np.uint8)

    def band(i):
        lo, hi = edges[i], edges[i + 1]
        if axis == 0:
            part = Image.fromarray(image[lo:hi]).resize((width, hi - lo), resample=resample)
            out[lo:hi] = np.asarray(part)
        else:
            part = Image.fromarray(np.ascontiguousarray(image[:, lo:hi]))
            out[:, lo:hi] = np.asarray(part.resize((hi - lo, height), resample=resample))

    cpu_pool.run_all(band, [i for i in range(workers) if edges[i] < edges[i + 1]])
    return out


def _order(geometry):
    """Return the learnt order of ``geometry``; start learning it when it is new."""
    with _lock:
        if geometry in _orders:
            _orders.move_to_end(geometry)
            return _orders[geometry]
        _orders[geometry] = None
        while len(_orders) > MAX_GEOMETRIES:
            _orders.popitem(last=False)
    cpu_pool.pool().submit(_learn, geometry)
    return None


def _learn(geometry):
    """
    Find which order of passes gives Pillow's bytes for ``geometry`` (background).

    The probe has one channel: Pillow picks the order from the sizes alone, and a grey
    image takes a quarter of the memory of an RGB one (Pillow keeps RGB in 4 bytes a pixel).
    The first request of a geometry runs beside this, and its vision encoder with it.
    """
    h, w, height, width, resample = geometry
    probe = np.random.default_rng(0).integers(0, 256, (h, w), dtype=np.uint8)
    expected = _pillow(probe, height, width, resample)
    order = PILLOW_ONLY
    for candidate in (HORIZONTAL_FIRST, VERTICAL_FIRST):
        # One band per pass: the pool's threads may all be busy with this very task.
        got = _two_passes(probe, height, width, resample, candidate == VERTICAL_FIRST, 1)
        if np.array_equal(got, expected):
            order = candidate
            break
    with _lock:
        if geometry in _orders:
            _orders[geometry] = order


def _workers():
    return cpu_pool.cores()
