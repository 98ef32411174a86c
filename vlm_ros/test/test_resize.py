"""
Resizing on several threads gives Pillow's bytes, for every filter and geometry.

The order of Pillow's two passes is learnt per geometry in the background; until it is
known, and for small images, Pillow resizes on its own.
"""

import time

import numpy as np
from PIL import Image
import pytest
from vlm_ros.engine import resize


@pytest.fixture
def threaded(monkeypatch):
    """Every image is large enough to split, on 3 workers (an odd number of bands)."""
    monkeypatch.setattr(resize, 'MIN_PIXELS', 0)
    monkeypatch.setattr(resize, '_workers', lambda: 3)
    monkeypatch.setattr(resize, '_orders', type(resize._orders)())
    return resize


def wait_learnt(module, timeout=30.0):
    deadline = time.monotonic() + timeout
    while any(order is None for order in module._orders.values()):
        assert time.monotonic() < deadline, 'orders not learnt'
        time.sleep(0.01)


def pillow(image, height, width, resample):
    return np.asarray(Image.fromarray(image).resize((width, height), resample=resample))


def test_same_bytes_as_pillow_before_and_after_learning(threaded):
    rng = np.random.default_rng(3)
    cases = []
    for _ in range(60):
        h, w, height, width = (int(v) for v in rng.integers(3, 160, 4))
        cases.append((h, w, height, width, int(rng.choice([0, 1, 2, 3, 4, 5]))))
    for attempt in ('first call', 'learnt'):
        for h, w, height, width, resample in cases:
            image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            got = threaded.resize(image, height, width, resample)
            assert np.array_equal(got, pillow(image, height, width, resample)), (
                attempt, h, w, height, width, resample)
        wait_learnt(threaded)
    orders = set(threaded._orders.values())
    # The second round ran on threads (recent Pillows use both orders, older ones one).
    assert orders & {resize.HORIZONTAL_FIRST, resize.VERTICAL_FIRST}, orders


def test_camera_image_to_smolvlm_sizes(threaded):
    """A 640x480 frame up to the 2048 px edge and down to a 512 px tile, as SmolVLM does."""
    image = np.random.default_rng(4).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    for height, width, source in ((1536, 2048, image), (512, 512, None)):
        source = source if source is not None else pillow(image, 1536, 2048, 1)
        first = threaded.resize(source, height, width, 1)
        wait_learnt(threaded)
        again = threaded.resize(source, height, width, 1)
        expected = pillow(source, height, width, 1)
        assert np.array_equal(first, expected) and np.array_equal(again, expected)
    assert None not in threaded._orders.values()


def test_small_images_and_one_core_stay_with_pillow(monkeypatch):
    monkeypatch.setattr(resize, '_orders', type(resize._orders)())
    image = np.zeros((40, 30, 3), dtype=np.uint8)
    resize.resize(image, 80, 60, 1)
    assert not resize._orders  # below MIN_PIXELS: nothing to learn
    monkeypatch.setattr(resize, 'MIN_PIXELS', 0)
    monkeypatch.setattr(resize, '_workers', lambda: 1)
    resize.resize(image, 80, 60, 1)
    assert not resize._orders
