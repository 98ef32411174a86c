"""
Synthetic shape scenes with question/answer pairs (training and test data, seeded).

A scene holds one to three shapes (circle, square, triangle, star, cross), each in its own
colour (red, green, blue, yellow, purple, orange) and at its own place (top, left, centre,
right, bottom: the edge middles and the centre of a 3 x 3 grid, so no two places are
ambiguous and every shape stays inside its cell), with a random size, a small offset and a
small rotation, on a neutral background (solid or gradient, with or without noise).
``render`` draws a scene as a square uint8 RGB array of any size (supersampled, then
Lanczos-downscaled).

Questions come in six kinds, each with a few phrasings; answers are short and canonical:

========== ================================= ==========================================
kind       example question                  example answer
========== ================================= ==========================================
describe   Describe this image.              a red circle on the left and a blue square
                                             on the right.
colour     What colour is the circle?        red
shape      What shape is the red object?     circle
count      How many shapes are there?        two
where      Where is the red circle?          left
exists     Is there a blue square?           yes
========== ================================= ==========================================

A description lists the shapes in reading order of their places (top, left, centre, right,
bottom).  Everything is a pure function of a ``numpy.random.Generator`` (``scene_rng``),
so a seed gives the same scenes, questions and pixels on every machine.  Only numpy and
Pillow are needed.
"""

from dataclasses import dataclass
import math
from typing import List, Tuple

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
# Places in reading order, with their centres as fractions of the image side: the middle
# cells of the edges and the centre cell of a 3 x 3 grid.
PLACES = {
    'top': (1 / 2, 1 / 6),
    'left': (1 / 6, 1 / 2),
    'centre': (1 / 2, 1 / 2),
    'right': (5 / 6, 1 / 2),
    'bottom': (1 / 2, 5 / 6),
}
# (row, column) of each place in that grid.
PLACE_CELLS = {'top': (0, 1), 'left': (1, 0), 'centre': (1, 1), 'right': (1, 2),
               'bottom': (2, 1)}
PLACE_PHRASES = {
    'top': 'at the top',
    'left': 'on the left',
    'centre': 'in the centre',
    'right': 'on the right',
    'bottom': 'at the bottom',
}
NUMBER_WORDS = ('zero', 'one', 'two', 'three')
MAX_SHAPES = 3
# Neutral backgrounds, far from every shape colour.
BACKGROUNDS = (
    (245, 245, 245), (222, 222, 222), (190, 190, 190), (150, 150, 150), (105, 105, 105),
    (60, 60, 60), (30, 30, 30), (235, 225, 205), (205, 215, 225), (215, 225, 210),
)
KINDS = ('describe', 'colour', 'shape', 'count', 'where', 'exists')
TEMPLATES = {
    'describe': ('Describe this image.', 'Describe the image.', 'What is in the picture?',
                 'What do you see?', 'What shapes are there?'),
    'colour': ('What colour is the {shape}?', 'What color is the {shape}?',
               'Which colour is the {shape}?'),
    'shape': ('What shape is the {colour} object?', 'What shape is {colour}?',
              'Which shape is {colour}?'),
    'count': ('How many shapes are there?', 'How many objects are there?',
              'How many shapes are in the image?'),
    'where': ('Where is the {colour} {shape}?', 'Where is the {shape}?',
              'Where is the {colour} object?'),
    'exists': ('Is there {a_colour} {shape}?', 'Is there {a_shape}?',
               'Is there {a_colour} object?'),
}
# Shape radius (centre to the farthest point) as a fraction of the image side; with the
# offsets below, every shape stays inside its grid cell (side 1/3).
MIN_RADIUS = 0.10
MAX_RADIUS = 0.14
MAX_OFFSET = 0.015
MAX_ROTATION = 15.0
DEFAULT_SIZE = 128
# The node's bundled sample image (vlm_ros/samples/scene.png).
SAMPLE_SEED = 7
SAMPLE_SIZE = 256


@dataclass(frozen=True)
class Item:
    """One shape of a scene."""

    shape: str
    colour: str
    place: str
    radius: float
    """Fraction of the image side."""
    offset: Tuple[float, float]
    """(x, y) shift of the centre, fraction of the image side."""
    rotation: float
    """Degrees."""
    tint: Tuple[int, int, int]
    """Small per-shape change of the colour's RGB value."""

    def phrase(self):
        """Return e.g. ``a red circle``."""
        return f'{article(self.colour)} {self.colour} {self.shape}'


@dataclass(frozen=True)
class Scene:
    """Shapes (in reading order of their places) and a background."""

    items: Tuple[Item, ...]
    background: Tuple[Tuple[int, int, int], Tuple[int, int, int]]
    """Colours at the start and end of the gradient (equal for a solid background)."""
    vertical: bool
    """Gradient direction."""
    noise: float
    """Standard deviation of the pixel noise (0-255 scale)."""
    noise_seed: int

    def find(self, shape=None, colour=None):
        """Return the items with ``shape`` and/or ``colour``."""
        return [i for i in self.items
                if (shape is None or i.shape == shape) and (colour is None or i.colour == colour)]


@dataclass(frozen=True)
class QA:
    """A question about a scene and its canonical answer."""

    kind: str
    question: str
    answer: str


def article(word):
    """Return ``an`` before a vowel sound, ``a`` otherwise."""
    return 'an' if word[0] in 'aeiou' else 'a'


def scene_rng(seed, stream=0):
    """Return the generator of data stream ``stream`` for ``seed`` (independent streams)."""
    return np.random.default_rng([int(seed), int(stream)])


def random_scene(rng, count=None):
    """Draw a scene (``count`` shapes, default 1 to 3) from ``rng``."""
    count = int(rng.integers(1, MAX_SHAPES + 1)) if count is None else count
    shapes = rng.choice(len(SHAPES), count, replace=False)
    colours = rng.choice(len(COLOURS), count, replace=False)
    places = sorted(rng.choice(len(PLACES), count, replace=False))
    names = list(COLOURS)
    place_names = list(PLACES)
    items = []
    for s, c, p in zip(shapes, colours, places, strict=True):
        items.append(Item(
            shape=SHAPES[s], colour=names[c], place=place_names[p],
            radius=float(rng.uniform(MIN_RADIUS, MAX_RADIUS)),
            offset=(float(rng.uniform(-MAX_OFFSET, MAX_OFFSET)),
                    float(rng.uniform(-MAX_OFFSET, MAX_OFFSET))),
            rotation=float(rng.uniform(-MAX_ROTATION, MAX_ROTATION)),
            tint=tuple(int(v) for v in rng.integers(-18, 19, 3)),
        ))
    first = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    if rng.random() < 0.5:
        second = first
    else:
        shift = int(rng.integers(-40, 41))
        second = tuple(int(np.clip(v + shift, 0, 255)) for v in first)
    noise = float(rng.uniform(0.0, 8.0)) if rng.random() < 0.5 else 0.0
    return Scene(items=tuple(items), background=(first, second), vertical=bool(rng.random() < 0.5),
                 noise=noise, noise_seed=int(rng.integers(2 ** 31)))


def _polygon(shape, cx, cy, r, rotation):
    """Return the corner points of a polygonal shape (None for a circle)."""
    if shape == 'circle':
        return None
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


def render(scene, size=DEFAULT_SIZE):
    """Draw ``scene`` as a ``size`` x ``size`` uint8 RGB array."""
    factor = 2
    side = size * factor
    start = np.array(scene.background[0], dtype=np.float32)
    end = np.array(scene.background[1], dtype=np.float32)
    ramp = np.linspace(0.0, 1.0, side, dtype=np.float32)
    grad = start[None, :] + (end - start)[None, :] * ramp[:, None]
    canvas = np.empty((side, side, 3), dtype=np.float32)
    canvas[:] = grad[:, None, :] if scene.vertical else grad[None, :, :]
    image = Image.fromarray(np.rint(canvas).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for item in scene.items:
        fx, fy = PLACES[item.place]
        cx = (fx + item.offset[0]) * side
        cy = (fy + item.offset[1]) * side
        r = item.radius * side
        fill = tuple(int(np.clip(v + d, 0, 255))
                     for v, d in zip(COLOURS[item.colour], item.tint, strict=True))
        points = _polygon(item.shape, cx, cy, r, item.rotation)
        if points is None:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(points, fill=fill)
    # Image.LANCZOS, not Image.Resampling.LANCZOS: Pillow 9.0 (Ubuntu 22.04) has no Resampling.
    image = image.resize((size, size), Image.LANCZOS)
    pixels = np.asarray(image, dtype=np.float32)
    if scene.noise > 0:
        noise = np.random.default_rng(scene.noise_seed).normal(0.0, scene.noise, pixels.shape)
        pixels = pixels + noise
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def describe(scene):
    """Return the canonical description, e.g. ``a red circle on the left.``."""
    parts = [f'{i.phrase()} {PLACE_PHRASES[i.place]}' for i in scene.items]
    if len(parts) == 1:
        text = parts[0]
    else:
        text = ', '.join(parts[:-1]) + ' and ' + parts[-1]
    return text + '.'


def _absent(scene, rng):
    """Return a (shape, colour) pair that is not in ``scene``, often a near miss."""
    present = {(i.shape, i.colour) for i in scene.items}
    roll = rng.random()
    item = scene.items[int(rng.integers(len(scene.items)))]
    if roll < 0.35:  # the shape is there, in another colour
        candidates = [(item.shape, c) for c in COLOURS]
    elif roll < 0.7:  # the colour is there, on another shape
        candidates = [(s, item.colour) for s in SHAPES]
    else:
        candidates = [(s, c) for s in SHAPES for c in COLOURS]
    candidates = [p for p in candidates if p not in present]
    return candidates[int(rng.integers(len(candidates)))]


def ask(scene, kind, rng):
    """Return a QA of ``kind`` about ``scene`` (question phrasing drawn from ``rng``)."""
    templates = TEMPLATES[kind]
    template = templates[int(rng.integers(len(templates)))]
    item = scene.items[int(rng.integers(len(scene.items)))]
    if kind == 'describe':
        return QA(kind, template, describe(scene))
    if kind == 'colour':
        return QA(kind, template.format(shape=item.shape), item.colour)
    if kind == 'shape':
        return QA(kind, template.format(colour=item.colour), item.shape)
    if kind == 'count':
        return QA(kind, template, NUMBER_WORDS[len(scene.items)])
    if kind == 'where':
        return QA(kind, template.format(shape=item.shape, colour=item.colour), item.place)
    if kind != 'exists':
        raise ValueError(f'unknown question kind {kind!r}')
    if rng.random() < 0.5:
        shape, colour = item.shape, item.colour
    else:
        shape, colour = _absent(scene, rng)
    if '{a_colour}' in template and '{shape}' in template:
        found = scene.find(shape, colour)
    elif '{a_shape}' in template:
        found = scene.find(shape=shape)
    else:
        found = scene.find(colour=colour)
    question = template.format(a_colour=f'{article(colour)} {colour}', shape=shape,
                               a_shape=f'{article(shape)} {shape}')
    return QA(kind, question, 'yes' if found else 'no')


def held_out_set(seed, num_scenes, size=DEFAULT_SIZE, kinds=KINDS):
    """
    Return ``[(image, scene, [QA per kind])]`` for evaluation (stream 1 of ``seed``).

    Every scene gets one question of each kind in ``kinds``.
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
    for kind in KINDS:
        for template in TEMPLATES[kind]:
            for shape in SHAPES:
                for colour in COLOURS:
                    question = template.format(
                        shape=shape, colour=colour, a_colour=f'{article(colour)} {colour}',
                        a_shape=f'{article(shape)} {shape}')
                    lines.append(f'User: {question}')
    lines = sorted(set(lines))
    # Short answers twice, so that each becomes one token (BPE merges need two sightings).
    lines += 2 * [f'Assistant: {word}' for word in
                  list(COLOURS) + list(SHAPES) + list(PLACES) + list(NUMBER_WORDS[1:]) +
                  ['yes', 'no']]
    rng = scene_rng(seed, 2)
    lines += [f'Assistant: {describe(random_scene(rng))}' for _ in range(num_scenes)]
    return lines


def sample_scene(seed=SAMPLE_SEED):
    """Return the scene of the node's bundled sample image (three shapes)."""
    return random_scene(scene_rng(seed, 3), count=3)


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
