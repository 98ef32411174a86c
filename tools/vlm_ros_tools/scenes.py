"""
Synthetic shape scenes with question/answer pairs (training and test data, seeded).

A scene holds one to three shapes (circle, square, triangle, star, cross), each in its own
colour (red, green, blue, yellow, purple, orange) and its own cell of a 3 x 3 grid (its
*place*: top left, top, ..., bottom right), at any position inside that cell, from 10% to 60%
of the image side (up to 35% when there are several), filled or outlined, slightly rotated
and tinted, on a light, mid or dark background (solid or gradient, with or without noise).
``render`` draws a scene as a square uint8 RGB array of any size with Pillow's ImageDraw,
hard-edged or anti-aliased (supersampled 2x or 4x), sometimes JPEG-compressed.

Questions come in seven kinds, each with several phrasings; answers are short and canonical:

========== =========================================== =====================================
kind       example question                            example answer
========== =========================================== =====================================
describe   Describe this image.                        a red circle at the top left and a
                                                       blue square in the centre.
colour     What colour is the circle?                  red
shape      What shape is the red object?               circle
count      How many shapes are there?                  two
where      Where is the red circle?                    top left
exists     Is there a blue square?                     yes
detect     Please provide the bounding box coordinate  <ref>red circle</ref><box>[[120, 080,
           of the region this sentence describes:      340, 300]]</box>
           <ref>red circle</ref>
========== =========================================== =====================================

``detect`` is InternVL's grounding question, answered in its format: the box corners in
thousandths of the image side, here in steps of 10 and written with three digits (at most
990), so that every coordinate is one token of the model's tokenizer (``NUMBER_TOKENS``).
A description lists the shapes in reading order of their places.  Everything is a pure
function of a ``numpy.random.Generator`` (``scene_rng``), so a seed gives the same scenes,
questions and pixels on every machine.  Only numpy and Pillow are needed.
"""

from dataclasses import dataclass
import io
import math
from typing import List, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ('circle', 'square', 'triangle', 'star', 'cross')
COLOURS = {
    'red': (215, 35, 35),
    'green': (35, 165, 55),
    'blue': (35, 85, 215),
    'yellow': (235, 205, 25),
    'purple': (135, 55, 175),
    'orange': (245, 130, 20),
}
# The cells of a 3 x 3 grid, row-major (reading order).
PLACES = ('top left', 'top', 'top right', 'left', 'centre', 'right', 'bottom left', 'bottom',
          'bottom right')
PLACE_PHRASES = {
    'top left': 'at the top left', 'top': 'at the top', 'top right': 'at the top right',
    'left': 'on the left', 'centre': 'in the centre', 'right': 'on the right',
    'bottom left': 'at the bottom left', 'bottom': 'at the bottom',
    'bottom right': 'at the bottom right',
}
NUMBER_WORDS = ('zero', 'one', 'two', 'three')
MAX_SHAPES = 3
# Shape extent (twice the centre-to-farthest-point radius) as a fraction of the image side.
MIN_EXTENT = 0.10
MAX_EXTENT = 0.60
MAX_EXTENT_SEVERAL = 0.30
# Largest shift of a shape's centre from its cell's centre (fraction of the side).
MAX_OFFSET = 0.04
MAX_ROTATION = 20.0
OUTLINE_RATE = 0.2
JPEG_RATE = 0.3
# Supersampling factors of the renderer (1: hard edges) and how often each is drawn.
SUPERSAMPLING = ((1, 0.3), (2, 0.4), (4, 0.3))
MAX_CANVAS = 512
# Neutral backgrounds, far from every shape colour: light, mid and dark.
BACKGROUNDS = (
    (250, 250, 250), (245, 245, 245), (232, 232, 232), (222, 222, 222), (205, 205, 205),
    (190, 190, 190), (150, 150, 150), (120, 120, 120), (90, 90, 90), (60, 60, 60),
    (40, 40, 40), (25, 25, 25), (10, 10, 10), (240, 232, 215), (205, 215, 225),
    (215, 225, 210), (50, 45, 40), (35, 40, 50),
)
KINDS = ('describe', 'colour', 'shape', 'count', 'where', 'exists', 'detect')
GROUNDING_QUESTION = ('Please provide the bounding box coordinate of the region this sentence '
                      'describes: <ref>{label}</ref>')
"""InternVL's grounding question (the engine's ``grounding.INTERNVL_PROMPT``)."""
TEMPLATES = {
    'describe': ('Describe this image.', 'Describe the image.', 'What is in the picture?',
                 'What do you see?', 'What shapes are there?', 'What is in the image?'),
    'colour': ('What colour is the {shape}?', 'What color is the {shape}?',
               'Which colour is the {shape}?', 'What is the colour of the {shape}?',
               'What is the color of the {shape}?'),
    'shape': ('What shape is the {colour} object?', 'What shape is {colour}?',
              'Which shape is {colour}?', 'What is the {colour} shape?',
              'What shape is the {colour} one?'),
    'count': ('How many shapes are there?', 'How many objects are there?',
              'How many shapes are in the image?', 'How many shapes do you see?',
              'Count the shapes.'),
    'where': ('Where is the {colour} {shape}?', 'Where is the {shape}?',
              'Where is the {colour} object?'),
    'exists': ('Is there {a_colour} {shape}?', 'Is there {a_shape}?',
               'Is there {a_colour} object?', 'Is there {a_shape} in the image?',
               'Do you see {a_colour} {shape}?'),
    'detect': (GROUNDING_QUESTION,),
}
# Questions about the only shape of a one-shape scene.
SINGLE_TEMPLATES = {
    'colour': ('What colour is the shape?', 'What color is the shape?', 'What colour is it?',
               'What color is the object?', 'What is the colour of the shape?'),
    'shape': ('What shape is this?', 'What shape is in the image?', 'What is the shape?',
              'Which shape is it?', 'What shape do you see?'),
}
# Labels of a grounding question about an item, and how often each is drawn.
LABELS = (('{colour} {shape}', 0.5), ('{shape}', 0.35), ('{colour} object', 0.15))
ABSENT_DETECT_RATE = 0.15
NO_BOX_ANSWER = 'none'
COORDINATE_STEP = 10
MAX_COORDINATE = 990
NUMBER_TOKENS = tuple(f'{v:03d}' for v in range(0, MAX_COORDINATE + 1, COORDINATE_STEP))
DEFAULT_SIZE = 128
# The node's bundled sample image (vlm_ros/samples/scene.png).
SAMPLE_SEED = 33
SAMPLE_SIZE = 256


@dataclass(frozen=True)
class Item:
    """One shape of a scene."""

    shape: str
    colour: str
    centre: Tuple[float, float]
    """(x, y), fractions of the image side."""
    radius: float
    """Centre to the farthest point, fraction of the image side."""
    rotation: float
    """Degrees."""
    tint: Tuple[int, int, int]
    """Small per-shape change of the colour's RGB value."""
    outline: float = 0.0
    """Stroke width as a fraction of the radius; 0: filled."""

    @property
    def place(self):
        """Return the name of the grid cell of the centre."""
        return PLACES[cell_of(self.centre)]

    @property
    def box(self):
        """Return (x1, y1, x2, y2) of the drawn shape, fractions of the image side."""
        points = outline_points(self.shape, self.centre[0], self.centre[1], self.radius,
                                self.rotation)
        xs = [x for x, _ in points]
        ys = [y for _, y in points]
        return (max(0.0, min(xs)), max(0.0, min(ys)), min(1.0, max(xs)), min(1.0, max(ys)))

    def phrase(self):
        """Return e.g. ``a red circle``."""
        return f'{article(self.colour)} {self.colour} {self.shape}'


@dataclass(frozen=True)
class Scene:
    """Shapes (in reading order of their places) and how the scene is drawn."""

    items: Tuple[Item, ...]
    background: Tuple[Tuple[int, int, int], Tuple[int, int, int]]
    """Colours at the start and end of the gradient (equal for a solid background)."""
    vertical: bool
    """Gradient direction."""
    noise: float
    """Standard deviation of the pixel noise (0-255 scale)."""
    noise_seed: int
    supersampling: int = 2
    """1: hard edges; 2 or 4: drawn larger and downscaled (anti-aliased)."""
    jpeg_quality: int = 0
    """0: no JPEG compression."""


@dataclass(frozen=True)
class QA:
    """A question about a scene, its canonical answer and (detect) the box asked for."""

    kind: str
    question: str
    answer: str
    box: Optional[Tuple[float, float, float, float]] = None
    """(x1, y1, x2, y2), fractions of the image width and height; None: no box expected."""


def find(items, shape=None, colour=None):
    """Return the ``items`` with ``shape`` and/or ``colour``."""
    return [i for i in items
            if (shape is None or i.shape == shape) and (colour is None or i.colour == colour)]


def article(word):
    """Return ``an`` before a vowel sound, ``a`` otherwise."""
    return 'an' if word[0] in 'aeiou' else 'a'


def cell_of(point):
    """Return the row-major index of the 3 x 3 grid cell holding ``point`` (x, y)."""
    col = min(2, max(0, int(point[0] * 3)))
    row = min(2, max(0, int(point[1] * 3)))
    return 3 * row + col


def scene_rng(seed, stream=0):
    """Return the generator of data stream ``stream`` for ``seed`` (independent streams)."""
    return np.random.default_rng([int(seed), int(stream)])


def _place_items(rng, count):
    """
    Return [(centre, radius)] of ``count`` shapes, one per cell, apart and inside the image.

    Each centre sits near its cell's centre (``MAX_OFFSET``): the model's image tokens are
    one per cell, and a from-scratch vision tower learns shapes far faster at steady places.
    A lone shape in the centre cell may take up to ``MAX_EXTENT`` of the side; other shapes
    stay within their cell's reach of the border.
    """
    while True:
        cells = sorted(int(c) for c in rng.choice(len(PLACES), count, replace=False))
        placed = []
        for cell in cells:
            centre = tuple(float((k + 0.5) / 3 + rng.uniform(-MAX_OFFSET, MAX_OFFSET))
                           for k in (cell % 3, cell // 3))
            top = MAX_EXTENT if count == 1 and cell == 4 else MAX_EXTENT_SEVERAL
            reach = min(min(c, 1 - c) for c in centre) - 0.01
            placed.append((centre, float(rng.uniform(MIN_EXTENT, min(top, 2 * reach))) / 2))
        if all(math.dist(a, b) >= ra + rb + 0.02 for i, (a, ra) in enumerate(placed)
               for b, rb in placed[i + 1:]):
            return placed


def random_scene(rng, count=None):
    """Draw a scene (``count`` shapes, default 1 to 3) from ``rng``."""
    count = int(rng.integers(1, MAX_SHAPES + 1)) if count is None else count
    shapes = rng.choice(len(SHAPES), count, replace=False)
    colours = rng.choice(len(COLOURS), count, replace=False)
    names = list(COLOURS)
    items = []
    for s, c, (centre, radius) in zip(shapes, colours, _place_items(rng, count), strict=True):
        outline = float(rng.uniform(0.15, 0.3)) if rng.random() < OUTLINE_RATE else 0.0
        items.append(Item(
            shape=SHAPES[s], colour=names[c], centre=centre, radius=radius,
            rotation=float(rng.uniform(-MAX_ROTATION, MAX_ROTATION)),
            tint=tuple(int(v) for v in rng.integers(-20, 21, 3)), outline=outline))
    first = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    if rng.random() < 0.5:
        second = first
    else:
        shift = int(rng.integers(-40, 41))
        second = tuple(int(np.clip(v + shift, 0, 255)) for v in first)
    noise = float(rng.uniform(0.0, 8.0)) if rng.random() < 0.4 else 0.0
    factors, weights = zip(*SUPERSAMPLING, strict=True)
    supersampling = int(rng.choice(factors, p=np.array(weights) / sum(weights)))
    jpeg = int(rng.integers(25, 91)) if rng.random() < JPEG_RATE else 0
    return Scene(items=tuple(items), background=(first, second),
                 vertical=bool(rng.random() < 0.5), noise=noise,
                 noise_seed=int(rng.integers(2 ** 31)), supersampling=supersampling,
                 jpeg_quality=jpeg)


def outline_points(shape, cx, cy, r, rotation, steps=32):
    """Return the corner points of a shape (a circle as ``steps`` points on it)."""
    if shape == 'circle':
        return [(cx + r * math.cos(2 * math.pi * k / steps),
                 cy + r * math.sin(2 * math.pi * k / steps)) for k in range(steps)]
    if shape == 'square':
        corners = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        scale = r / math.sqrt(2.0)
        points = [(x * scale, y * scale) for x, y in corners]
    elif shape == 'triangle':
        points = [(r * math.sin(a), -r * math.cos(a) + 0.2 * r)
                  for a in (0.0, 2 * math.pi / 3, 4 * math.pi / 3)]
    elif shape == 'star':
        points = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = k * math.pi / 5
            points.append((rad * math.sin(a), -rad * math.cos(a) + 0.08 * r))
    elif shape == 'cross':
        w = r * 0.36
        arm = r * 0.92
        points = [(-w, -arm), (w, -arm), (w, -w), (arm, -w), (arm, w), (w, w), (w, arm),
                  (-w, arm), (-w, w), (-arm, w), (-arm, -w), (-w, -w)]
    else:
        raise ValueError(f'unknown shape {shape!r}')
    t = math.radians(rotation)
    cos, sin = math.cos(t), math.sin(t)
    return [(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in points]


def _background(scene, side):
    start = np.array(scene.background[0], dtype=np.float32)
    end = np.array(scene.background[1], dtype=np.float32)
    ramp = np.linspace(0.0, 1.0, side, dtype=np.float32)
    grad = start[None, :] + (end - start)[None, :] * ramp[:, None]
    canvas = np.empty((side, side, 3), dtype=np.float32)
    canvas[:] = grad[:, None, :] if scene.vertical else grad[None, :, :]
    return Image.fromarray(np.rint(canvas).astype(np.uint8))


def _draw_item(draw, item, side):
    cx, cy = item.centre[0] * side, item.centre[1] * side
    r = item.radius * side
    fill = tuple(int(np.clip(v + d, 0, 255))
                 for v, d in zip(COLOURS[item.colour], item.tint, strict=True))
    stroke = max(1, int(round(item.outline * r)))
    if item.shape == 'circle':
        box = [cx - r, cy - r, cx + r, cy + r]
        if item.outline:
            draw.ellipse(box, outline=fill, width=stroke)
        else:
            draw.ellipse(box, fill=fill)
        return
    points = outline_points(item.shape, cx, cy, r, item.rotation)
    if item.outline:
        # A closed line, not polygon(width=): Pillow 9.0 (Ubuntu 22.04) has no polygon width.
        draw.line(points + points[:2], fill=fill, width=stroke, joint='curve')
    else:
        draw.polygon(points, fill=fill)


def render(scene, size=DEFAULT_SIZE):
    """Draw ``scene`` as a ``size`` x ``size`` uint8 RGB array."""
    # Supersampled on a canvas of at most MAX_CANVAS: drawing cost, not looks, grows past it.
    side = size * max(1, min(scene.supersampling, MAX_CANVAS // size))
    image = _background(scene, side)
    draw = ImageDraw.Draw(image)
    for item in scene.items:
        _draw_item(draw, item, side)
    if side > size:
        # Image.LANCZOS, not Image.Resampling.LANCZOS: Pillow 9.0 has no Resampling.
        image = image.resize((size, size), Image.LANCZOS)
    pixels = np.asarray(image, dtype=np.float32)
    if scene.noise > 0:
        noise = np.random.default_rng(scene.noise_seed).normal(0.0, scene.noise, pixels.shape)
        pixels = pixels + noise
    pixels = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    if scene.jpeg_quality:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format='JPEG', quality=scene.jpeg_quality)
        pixels = np.asarray(Image.open(buffer).convert('RGB'))
    return pixels


def describe(scene):
    """Return the canonical description, e.g. ``a red circle on the left.``."""
    parts = [f'{i.phrase()} {PLACE_PHRASES[i.place]}' for i in scene.items]
    if len(parts) == 1:
        text = parts[0]
    else:
        text = ', '.join(parts[:-1]) + ' and ' + parts[-1]
    return text + '.'


def coordinate(value):
    """Write one corner value of a box, a fraction of the side, as answers do: ``080``."""
    step = int(round(value * 1000 / COORDINATE_STEP)) * COORDINATE_STEP
    return f'{min(MAX_COORDINATE, max(0, step)):03d}'


def box_answer(label, box):
    """Return InternVL's answer locating ``label`` at ``box`` (fractions of the side)."""
    return f'<ref>{label}</ref><box>[[' + ', '.join(coordinate(v) for v in box) + ']]</box>'


def _absent(items, rng):
    """Return a (shape, colour) pair that is not among ``items``, often a near miss."""
    present = {(i.shape, i.colour) for i in items}
    roll = rng.random()
    item = items[int(rng.integers(len(items)))]
    if roll < 0.35:  # the shape is there, in another colour
        candidates = [(item.shape, c) for c in COLOURS]
    elif roll < 0.7:  # the colour is there, on another shape
        candidates = [(s, item.colour) for s in SHAPES]
    else:
        candidates = [(s, c) for s in SHAPES for c in COLOURS]
    candidates = [p for p in candidates if p not in present]
    return candidates[int(rng.integers(len(candidates)))]


def _pick(rng, options):
    return options[int(rng.integers(len(options)))]


def _detect(items, rng, absent_rate):
    """Return a grounding QA about one item (or, at ``absent_rate``, a label not there)."""
    forms, weights = zip(*LABELS, strict=True)
    form = forms[int(rng.choice(len(forms), p=np.array(weights) / sum(weights)))]
    item = items[int(rng.integers(len(items)))]
    if rng.random() < absent_rate:
        shape, colour = _absent(items, rng)
        label = form.format(shape=shape, colour=colour)
        matches = find(items, None if '{shape}' not in form else shape,
                       None if '{colour}' not in form else colour)
        if not matches:
            return QA('detect', GROUNDING_QUESTION.format(label=label), NO_BOX_ANSWER)
    label = form.format(shape=item.shape, colour=item.colour)
    return QA('detect', GROUNDING_QUESTION.format(label=label), box_answer(label, item.box),
              item.box)


def _exists(items, template, rng):
    if rng.random() < 0.5:
        item = _pick(rng, items)
        shape, colour = item.shape, item.colour
    else:
        shape, colour = _absent(items, rng)
    if '{a_colour}' in template and '{shape}' in template:
        found = find(items, shape, colour)
    elif '{a_shape}' in template:
        found = find(items, shape=shape)
    else:
        found = find(items, colour=colour)
    question = template.format(a_colour=f'{article(colour)} {colour}', shape=shape,
                               a_shape=f'{article(shape)} {shape}')
    return QA('exists', question, 'yes' if found else 'no')


def ask(scene, kind, rng, absent_rate=0.0):
    """
    Return a QA of ``kind`` about ``scene`` (phrasing drawn from ``rng``).

    Only ``scene.items`` is read, and of each item ``shape``, ``colour``, ``place`` and
    ``box``, so scenes drawn by other renderers can be asked too.  ``absent_rate``: how often
    a grounding question names something that is not there (answered ``none``).
    """
    items = scene.items
    if kind == 'detect':
        return _detect(items, rng, absent_rate)
    templates = TEMPLATES[kind]
    if kind in SINGLE_TEMPLATES and len(items) == 1 and rng.random() < 0.4:
        templates = SINGLE_TEMPLATES[kind]
    template = _pick(rng, templates)
    item = _pick(rng, items)
    if kind == 'describe':
        return QA(kind, template, describe(scene))
    if kind == 'colour':
        return QA(kind, template.format(shape=item.shape), item.colour)
    if kind == 'shape':
        return QA(kind, template.format(colour=item.colour), item.shape)
    if kind == 'count':
        return QA(kind, template, NUMBER_WORDS[len(items)])
    if kind == 'where':
        return QA(kind, template.format(shape=item.shape, colour=item.colour), item.place)
    if kind != 'exists':
        raise ValueError(f'unknown question kind {kind!r}')
    return _exists(items, template, rng)


def held_out_set(seed, num_scenes, size=DEFAULT_SIZE, kinds=KINDS):
    """
    Return ``[(image, scene, [QA per kind])]`` for evaluation (stream 1 of ``seed``).

    Every scene gets one question of each kind in ``kinds``; grounding questions name a
    shape that is there.
    """
    rng = scene_rng(seed, 1)
    out = []
    for _ in range(num_scenes):
        scene = random_scene(rng)
        out.append((render(scene, size), scene, [ask(scene, k, rng) for k in kinds]))
    return out


def normalise(text):
    """Lower-case, single-spaced, without surrounding whitespace or a final period."""
    text = ' '.join(text.strip().lower().split())
    return text[:-1].rstrip() if text.endswith('.') else text


def is_correct(answer, expected):
    """Tell whether a model ``answer`` equals the canonical ``expected`` one."""
    return normalise(answer) == normalise(expected)


def corpus_lines(seed=0, num_scenes=2000) -> List[str]:
    """Return chat-style text lines covering every phrasing (for training a tokenizer)."""
    lines = []
    templates = [t for kind in KINDS for t in TEMPLATES[kind]]
    templates += [t for options in SINGLE_TEMPLATES.values() for t in options]
    labels = [form.format(shape=s, colour=c) for form, _ in LABELS for s in SHAPES
              for c in COLOURS]
    for template in templates:
        for shape in SHAPES:
            for colour in COLOURS:
                question = template.format(
                    shape=shape, colour=colour, a_colour=f'{article(colour)} {colour}',
                    a_shape=f'{article(shape)} {shape}', label=labels[len(lines) % len(labels)])
                lines.append(f'User: {question}')
    lines = sorted(set(lines))
    # Short answers twice, so that each becomes one token (BPE merges need two sightings).
    words = (list(COLOURS) + list(SHAPES) + [w for p in PLACES for w in p.split()] +
             list(NUMBER_WORDS[1:]) + ['yes', 'no', NO_BOX_ANSWER])
    lines += 2 * [f'Assistant: {word}' for word in words]
    lines += [f'Assistant: {box_answer(label, (0.1, 0.2, 0.3, 0.4))}' for label in labels]
    rng = scene_rng(seed, 2)
    lines += [f'Assistant: {describe(random_scene(rng))}' for _ in range(num_scenes)]
    return lines


def sample_scene(seed=SAMPLE_SEED):
    """Return the scene of the node's bundled sample image (three filled shapes)."""
    scene = random_scene(scene_rng(seed, 3), count=3)
    items = tuple(Item(i.shape, i.colour, i.centre, i.radius, i.rotation, i.tint)
                  for i in scene.items)
    return Scene(items=items, background=scene.background, vertical=scene.vertical,
                 noise=0.0, noise_seed=0, supersampling=4, jpeg_quality=0)


def write_image(image, path):
    """Save a uint8 RGB array as an image file (format from the suffix)."""
    Image.fromarray(image).save(path)


def main(argv=None):
    """Command line: write a scene image and print its description and questions."""
    import argparse

    parser = argparse.ArgumentParser(description='Write a synthetic shape scene.')
    parser.add_argument('out', help='image file to write (e.g. scene.png)')
    parser.add_argument('--seed', type=int, default=SAMPLE_SEED,
                        help='scene seed (default: the bundled sample)')
    parser.add_argument('--size', type=int, default=SAMPLE_SIZE)
    args = parser.parse_args(argv)
    scene = sample_scene(args.seed)
    write_image(render(scene, args.size), args.out)
    print(describe(scene))
    rng = scene_rng(args.seed, 4)
    for kind in KINDS[1:]:
        qa = ask(scene, kind, rng)
        print(f'{qa.question} {qa.answer}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
