"""
Shape scenes drawn by a second, independent renderer: an evaluation set unlike training's.

The default model trains on ``scenes.render`` (Pillow's ImageDraw).  Here the same kind of
scene -- one to three shapes (circle, square, triangle, star, cross), each in its own colour
and its own cell of a 3 x 3 grid, near the cell's centre; a lone shape in the centre cell up
to 60% of the side -- is drawn from numpy masks computed on the pixel grid: the signed
distance of every pixel centre (or of 4 x 4 samples per pixel, averaged, when anti-aliased)
to the shape's outline.  Colours, backgrounds, proportions, outline strokes and JPEG
settings are this module's own, and image sides range from 48 to 640 pixels, so the set
measures how well the model carries over to pixels it never saw.  Questions come from
``scenes.ask``, which reads only ``items`` (``shape``, ``colour``, ``place``, ``box``).

``python -m vlm_ros_tools.drawn_scenes OUT_DIR --seed 0 --scenes 12`` writes PNG files and
prints each scene's items.  Needs numpy and OpenCV (JPEG round trip, PNG writing).
"""

import argparse
from dataclasses import dataclass
import math
import os
from typing import Tuple

import cv2
import numpy as np

from . import scenes

# The model's vocabulary and grid are those of scenes; only the drawing is this module's.
SHAPES = scenes.SHAPES
# This renderer's own RGB values, near but not equal to the training palette.
COLOURS = {
    'red': (220, 30, 30),
    'green': (40, 170, 60),
    'blue': (30, 80, 220),
    'yellow': (240, 210, 30),
    'purple': (140, 60, 180),
    'orange': (250, 140, 20),
}
COLOUR_JITTER = 15
PLACES = scenes.PLACES
KINDS = ('colour', 'shape', 'count', 'exists', 'detect')
STREAM = 7
MIN_SIDE, MAX_SIDE = 48, 640
MAX_SHAPES = scenes.MAX_SHAPES
# Bounding box side (the larger of width and height) as a fraction of the image side.
MIN_EXTENT = 0.10
MAX_EXTENT = 0.60
MAX_EXTENT_SEVERAL = 0.30
# Largest shift of a centre from its cell's centre, fraction of the side.
MAX_OFFSET = 0.05
MAX_SQUARE_ROTATION = 15.0
OUTLINE_RATE = 0.25
ANTI_ALIAS_RATE = 0.5
SUPERSAMPLE = 4
# A pixel counts as drawn (for the truth box) at half the shape's peak coverage.
DRAWN_COVERAGE = 0.5
MAX_NOISE = 6.0
JPEG_RATE = 0.4
# Sample rows per band when computing distances, to bound memory on large shapes.
BAND_ROWS = 256


@dataclass(frozen=True)
class DrawnItem:
    """One drawn shape, with what ``scenes.ask`` reads."""

    shape: str
    colour: str
    place: str
    """Cell of the box centre in a 3 x 3 grid (``PLACES``)."""
    box: Tuple[float, float, float, float]
    """(x1, y1, x2, y2) of the drawn pixels, fractions of the image width and height."""


@dataclass(frozen=True)
class DrawnScene:
    """The shapes of a drawn image (reading order of their places) and its side in pixels."""

    items: Tuple[DrawnItem, ...]
    size: int


@dataclass(frozen=True)
class _Outline:
    """A shape around the centre of its bounding box, in pixels."""

    polygon: np.ndarray
    """(M, 2) vertices (x, y); empty for a circle."""
    radius: float
    """Circle radius; 0 for a polygon."""
    half: Tuple[float, float]
    """Half width and half height of the bounding box."""
    reach: float
    """Distance from the box centre to the farthest outline point."""


def _polygon_outline(vertices, extent):
    """Scale ``vertices`` to a bounding box side of ``extent`` and centre that box."""
    vertices = np.asarray(vertices, dtype=np.float64)
    low, high = vertices.min(axis=0), vertices.max(axis=0)
    vertices = (vertices - (low + high) / 2) * (extent / float((high - low).max()))
    half = tuple(float(v) for v in vertices.max(axis=0))
    return _Outline(vertices, 0.0, half, float(np.hypot(*vertices.T).max()))


def _unit_vertices(shape, rng):
    """Return the vertices of ``shape`` at any scale, with its random proportions."""
    if shape == 'square':
        angle = math.radians(rng.uniform(-MAX_SQUARE_ROTATION, MAX_SQUARE_ROTATION)
                             if rng.random() < 0.5 else 0.0)
        corners = np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], dtype=np.float64)
        rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        return corners @ rot.T
    if shape == 'triangle':
        ratio = rng.uniform(0.9, 1.3)  # base width over height, apex up
        return [(0.0, -0.5), (ratio / 2, 0.5), (-ratio / 2, 0.5)]
    if shape == 'star':
        inner = rng.uniform(0.4, 0.5)
        angles = -math.pi / 2 + np.arange(10) * math.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, inner)
        return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    if shape == 'cross':
        a, h = rng.uniform(0.30, 0.40) / 2, 0.5  # half bar thickness, half extent
        return [(-a, -h), (a, -h), (a, -a), (h, -a), (h, a), (a, a), (a, h), (-a, h),
                (-a, a), (-h, a), (-h, -a), (-a, -a)]
    raise ValueError(f'unknown shape {shape!r}')


def _outline(shape, extent, rng):
    """Return the outline of ``shape`` with a bounding box side of ``extent`` pixels."""
    if shape == 'circle':
        r = extent / 2
        return _Outline(np.empty((0, 2)), r, (r, r), r)
    return _polygon_outline(_unit_vertices(shape, rng), extent)


def _signed_distance(outline, x, y):
    """Return the distance of points (x, y) to the outline, negative inside."""
    if not len(outline.polygon):
        return np.hypot(x, y) - outline.radius
    inside = np.zeros(x.shape, dtype=bool)
    dist = np.full(x.shape, np.inf)
    ends = np.roll(outline.polygon, -1, axis=0)
    for (ax, ay), (bx, by) in zip(outline.polygon, ends, strict=True):
        # Even-odd rule: count crossings of a ray towards +x.
        spans = (ay > y) != (by > y)
        with np.errstate(divide='ignore', invalid='ignore'):
            cross_x = ax + (y - ay) * (bx - ax) / (by - ay)
        inside ^= spans & (x < cross_x)
        dx, dy = bx - ax, by - ay
        t = np.clip(((x - ax) * dx + (y - ay) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
        dist = np.minimum(dist, np.hypot(x - ax - t * dx, y - ay - t * dy))
    return np.where(inside, -dist, dist)


def _coverage(outline, centre, window, factor, stroke):
    """
    Return the fraction of each pixel of ``window`` covered by the shape.

    ``window`` = (x0, y0, x1, y1) in pixels; ``factor`` samples per pixel side (1: hard
    edges); ``stroke`` > 0 keeps only the band that deep inside the outline.
    """
    x0, y0, x1, y1 = window
    offsets = (np.arange(factor) + 0.5) / factor
    xs = (np.arange(x0, x1)[:, None] + offsets).ravel() - centre[0]
    ys = (np.arange(y0, y1)[:, None] + offsets).ravel() - centre[1]
    drawn = np.empty((len(ys), len(xs)), dtype=bool)
    for start in range(0, len(ys), BAND_ROWS):
        band = ys[start:start + BAND_ROWS, None]
        sdf = _signed_distance(outline, np.broadcast_to(xs, (len(band), len(xs))),
                               np.broadcast_to(band, (len(band), len(xs))))
        drawn[start:start + BAND_ROWS] = (sdf <= 0) & ((sdf > -stroke) if stroke else True)
    return drawn.reshape(y1 - y0, factor, x1 - x0, factor).mean(axis=(1, 3))


def _place_all(outlines, cells, side, rng, tries=100):
    """
    Return box centres (x, y) in pixels near the centres of the shapes' grid cells.

    Every shape stays inside and apart from the others; None if they do not fit.
    """
    margin, gap = 1.0, max(2.0, 0.02 * side)
    centres = []
    for outline, cell in zip(outlines, cells, strict=True):
        hw, hh = outline.half
        middle = ((cell % 3 + 0.5) * side / 3, (cell // 3 + 0.5) * side / 3)
        for _ in range(tries):
            c = tuple(m + rng.uniform(-MAX_OFFSET, MAX_OFFSET) * side for m in middle)
            inside = hw + margin <= c[0] <= side - hw - margin and \
                hh + margin <= c[1] <= side - hh - margin
            # Bounding circles around the box centres, a gap apart.
            if inside and all(math.dist(c, p) >= outline.reach + o.reach + gap
                              for p, o in zip(centres, outlines, strict=False)):
                centres.append(c)
                break
        else:
            return None
    return centres


def _layout(rng, side):
    """Return [(shape, colour, outline, centre)] of a new scene of side ``side``."""
    count = int(rng.integers(1, MAX_SHAPES + 1))
    shapes = [SHAPES[i] for i in rng.choice(len(SHAPES), count, replace=False)]
    colours = [list(COLOURS)[i] for i in rng.choice(len(COLOURS), count, replace=False)]
    # The scenes the model is documented to know: one shape per cell of a 3 x 3 grid, near
    # its centre; only a lone shape in the centre cell may be large.
    cells = [4] if count == 1 and rng.random() < 0.5 else \
        [int(c) for c in rng.choice(9, count, replace=False)]
    while True:  # big shapes may not fit together: draw the sizes again
        outlines = [_outline(s, rng.uniform(MIN_EXTENT, MAX_EXTENT if count == 1 and cell == 4
                                            else MAX_EXTENT_SEVERAL) * side, rng)
                    for s, cell in zip(shapes, cells, strict=True)]
        centres = _place_all(outlines, cells, side, rng)
        if centres is not None:
            return list(zip(shapes, colours, outlines, centres, strict=True))


def _background(rng, side):
    """Return a light or dark solid float background, sometimes with mild noise."""
    if rng.random() < 0.5:
        grey = rng.uniform(200, 250)
        # Off-white: a small warm or cool cast on some light backgrounds.
        tone = grey + (rng.uniform(-8, 8, 3) if rng.random() < 0.5 else np.zeros(3))
    else:
        tone = np.full(3, rng.uniform(15, 70))
    image = np.empty((side, side, 3))
    image[:] = tone
    if rng.random() < 0.4:
        image += rng.normal(0.0, rng.uniform(1.0, MAX_NOISE), image.shape)
    return image


def _draw(image, outline, centre, colour, rng):
    """Blend one shape into ``image``; return its drawn pixel box (x0, y0, x1, y1)."""
    side = image.shape[0]
    hw, hh = outline.half
    window = (max(0, math.floor(centre[0] - hw) - 1), max(0, math.floor(centre[1] - hh) - 1),
              min(side, math.ceil(centre[0] + hw) + 1), min(side, math.ceil(centre[1] + hh) + 1))
    factor = SUPERSAMPLE if rng.random() < ANTI_ALIAS_RATE else 1
    # At least 1.5 px, so that a small outline still covers whole pixels.
    stroke = (max(1.5, rng.uniform(0.08, 0.15) * 2 * max(hw, hh))
              if rng.random() < OUTLINE_RATE else 0.0)
    cover = _coverage(outline, centre, window, factor, stroke)[..., None]
    rgb = np.array(COLOURS[colour]) + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3)
    x0, y0, x1, y1 = window
    image[y0:y1, x0:x1] = image[y0:y1, x0:x1] * (1 - cover) + np.clip(rgb, 0, 255) * cover
    rows = np.flatnonzero(cover.max(axis=(1, 2)) >= DRAWN_COVERAGE * cover.max())
    cols = np.flatnonzero(cover.max(axis=(0, 2)) >= DRAWN_COVERAGE * cover.max())
    return x0 + cols[0], y0 + rows[0], x0 + cols[-1] + 1, y0 + rows[-1] + 1


def _jpeg(image, quality):
    """Return ``image`` after a JPEG round trip at ``quality``."""
    ok, data = cv2.imencode('.jpg', image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError('JPEG encoding failed')
    return np.ascontiguousarray(cv2.imdecode(data, cv2.IMREAD_COLOR)[..., ::-1])


def place_of(x, y):
    """Return the name of the 3 x 3 grid cell holding (x, y), fractions of the side."""
    return PLACES[scenes.cell_of((x, y))]


def draw_scene(rng):
    """Draw a new scene from ``rng``; return (uint8 RGB image, ``DrawnScene``)."""
    side = int(round(math.exp(rng.uniform(math.log(MIN_SIDE), math.log(MAX_SIDE)))))
    layout = _layout(rng, side)
    image = _background(rng, side)
    items = []
    for shape, colour, outline, centre in layout:
        x0, y0, x1, y1 = (int(v) / side for v in _draw(image, outline, centre, colour, rng))
        items.append(DrawnItem(shape, colour, place_of((x0 + x1) / 2, (y0 + y1) / 2),
                               (x0, y0, x1, y1)))
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    if rng.random() < JPEG_RATE:
        image = _jpeg(image, rng.integers(30, 91))
    items.sort(key=lambda i: (PLACES.index(i.place), i.box[0]))
    return image, DrawnScene(tuple(items), side)


def drawn_set(seed, num_scenes, kinds=KINDS):
    """
    Return ``[(image, scene, [QA per kind])]``: ``num_scenes`` drawn scenes of ``seed``.

    A pure function of the seed (generator ``default_rng([seed, 7])``); every scene gets one
    ``scenes.ask`` question of each kind in ``kinds``.
    """
    rng = np.random.default_rng([int(seed), STREAM])
    out = []
    for _ in range(num_scenes):
        image, scene = draw_scene(rng)
        out.append((image, scene, [scenes.ask(scene, k, rng) for k in kinds]))
    return out


def describe_items(scene):
    """Return one line per item, e.g. ``red circle, top left, box (0.10, ...)``."""
    return '\n'.join(f'{i.colour} {i.shape}, {i.place}, box (' +
                     ', '.join(f'{v:.3f}' for v in i.box) + ')' for i in scene.items)


def main(argv=None):
    """Command line: write drawn scenes as PNG files and print their items."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0].strip())
    parser.add_argument('out_dir', help='folder for the PNG files (created if missing)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--scenes', type=int, default=12)
    args = parser.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    for n, (image, scene, qas) in enumerate(drawn_set(args.seed, args.scenes)):
        path = os.path.join(args.out_dir, f'drawn_{args.seed}_{n:03d}.png')
        cv2.imwrite(path, image[..., ::-1])
        print(f'{path} ({scene.size} px)\n{describe_items(scene)}')
        for qa in qas:
            print(f'  {qa.question} -> {qa.answer}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
