"""
Boxes in a model's answer: parsed, then mapped to pixels of the image the caller sent.

Three answer syntaxes are read, wherever they sit in the text (prose, markdown fences):

* InternVL: ``<ref>cup</ref><box>[[x1, y1, x2, y2], ...]</box>`` (a ``<box>`` without a
  ``<ref>`` takes the label asked for);
* Qwen2-VL: ``<|object_ref_start|>cup<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>``;
* Qwen2.5-VL / VLM-R1: JSON ``[{"bbox_2d": [x1, y1, x2, y2], "label": "cup"}, ...]``.

Coordinates follow one of two conventions, declared by the model family (or, for a remote
server, by a setting): ``normalized_1000`` (0-1000 of the image, whatever size the model saw)
or ``absolute`` (pixels of the image the model saw, after its own resize). A box that cannot
be read or is empty after clipping is dropped and counted, never raised.
"""

import dataclasses
from dataclasses import dataclass
import json
import math
import re
from typing import List, Optional, Sequence, Tuple

from vlm_ros.engine.datatypes import Box, FINISH_CANCELLED, Result, Timings
from vlm_ros.engine.errors import VlmError

NORMALIZED_1000 = 'normalized_1000'
ABSOLUTE = 'absolute'
BOX_FORMATS = (NORMALIZED_1000, ABSOLUTE)

INTERNVL_PROMPT = ('Please provide the bounding box coordinate of the region this sentence '
                   'describes: <ref>{label}</ref>')
"""The grounding question InternVL2.5/3 were trained on (their published examples)."""
JSON_PROMPT = ('Locate every {labels} in the image. Answer with JSON only: '
               '[{"bbox_2d": [x1, y1, x2, y2], "label": "<name>"}, ...], or [] if none.')
"""One question for every label, answered in Qwen2.5-VL's JSON (its own wording for this
project, in the spirit of the open-vocabulary detection prompt of VLM-R1)."""
QWEN2VL_PROMPT = 'Find <|object_ref_start|>{label}<|object_ref_end|>'
"""Qwen2-VL's referring-grounding question: the phrase between its object-reference
markers (as special tokens), answered ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>`` in 0-1000,
optionally after the phrase in the same markers."""
QWEN25VL_PROMPT = ('Look at the image closely and find these objects: {labels}. For each one '
                   'you find, give its bounding box and its name as JSON, '
                   '[{"bbox_2d": [x1, y1, x2, y2], "label": "<name>"}, ...], in pixels of '
                   'the image. If none of them is there, answer None.')
"""One question about every label in the shape of VLM-R1's open-vocabulary detection task
(worded for this project), answered by Qwen2.5-VL and VLM-R1 in JSON, in pixels of the image
the model saw; an answer of ``None`` (or ``[]``) means no boxes."""

_NUMBER = r'[-+]?\d+(?:\.\d+)?'
_INTERNVL = re.compile(r'(?:<ref>(.*?)</ref>\s*)?<box>(.*?)</box>', re.S)
_QWEN2 = re.compile(r'(?:<\|object_ref_start\|>(.*?)<\|object_ref_end\|>\s*)?'
                    r'<\|box_start\|>(.*?)<\|box_end\|>', re.S)
_QUADRUPLE = re.compile(r'\[\s*(' + _NUMBER + r')\s*,\s*(' + _NUMBER + r')\s*,\s*(' +
                        _NUMBER + r')\s*,\s*(' + _NUMBER + r')\s*\]')
_POINT_PAIR = re.compile(r'\(\s*(' + _NUMBER + r')\s*,\s*(' + _NUMBER + r')\s*\)\s*,?\s*\(\s*(' +
                         _NUMBER + r')\s*,\s*(' + _NUMBER + r')\s*\)')


@dataclass
class Parsed:
    """Boxes as the model wrote them (its own coordinates) and how many were unreadable."""

    boxes: List[Box]
    dropped: int = 0


def parse(text: str, default_label: str = '') -> Parsed:
    """Read every box in ``text`` in any of the three syntaxes."""
    boxes: List[Box] = []
    dropped = 0
    for pattern, corners in ((_INTERNVL, _QUADRUPLE), (_QWEN2, _POINT_PAIR)):
        for match in pattern.finditer(text):
            label = (match.group(1) or default_label).strip()
            found = corners.findall(match.group(2))
            # InternVL writes [[...], [...]] and Qwen2-VL (..),(..): anything else inside
            # the tags, or nothing, is a malformed box.
            rest = corners.sub('', match.group(2)).strip(' \t\n[],')
            if not found or rest:
                dropped += 1
            boxes += [Box(label, *map(float, numbers)) for numbers in found]
    json_boxes, json_dropped = _parse_json(text, default_label)
    return Parsed(boxes + json_boxes, dropped + json_dropped)


def _parse_json(text, default_label):
    """Find JSON arrays or objects holding ``bbox_2d`` (or ``bbox``) entries anywhere."""
    decoder = json.JSONDecoder()
    boxes, dropped, i = [], 0, 0
    while True:
        starts = [j for j in (text.find('[', i), text.find('{', i)) if j >= 0]
        if not starts:
            return boxes, dropped
        i = min(starts)
        try:
            value, end = decoder.raw_decode(text, i)
        except ValueError:
            i += 1
            continue
        items = value if isinstance(value, list) else [value]
        entries = [item for item in items if isinstance(item, dict) and
                   ('bbox_2d' in item or 'bbox' in item)]
        for item in entries:
            box = _json_box(item, default_label)
            if box is None:
                dropped += 1
            else:
                boxes.append(box)
        i = end if entries else i + 1


def _json_box(item, default_label) -> Optional[Box]:
    coords = item.get('bbox_2d', item.get('bbox'))
    if not isinstance(coords, (list, tuple)) or len(coords) != 4:
        return None
    try:
        x1, y1, x2, y2 = (float(c) for c in coords)
        score = float(item.get('score', item.get('confidence', 1.0)))
    except (TypeError, ValueError):
        return None
    label = item.get('label', default_label)
    return Box(str(label).strip() if label is not None else default_label,
               x1, y1, x2, y2, score)


def to_image(parsed: Parsed, box_format: str, image_size: Tuple[int, int],
             seen_size: Optional[Tuple[int, int]] = None) -> Parsed:
    """
    Map boxes to pixels of the original image, ``image_size`` = (width, height).

    ``seen_size`` (width, height) is the size the model saw, needed for ``absolute`` boxes.
    Corners are put in order and clipped to the image; a box with no area left, or with a
    coordinate that is not finite, is dropped (and counted).
    """
    if box_format not in BOX_FORMATS:
        raise ValueError(f'box_format must be one of {BOX_FORMATS}, got {box_format!r}')
    width, height = image_size
    if box_format == NORMALIZED_1000:
        sx, sy = width / 1000.0, height / 1000.0
    else:
        seen_w, seen_h = seen_size or image_size
        sx, sy = width / seen_w, height / seen_h
    boxes, dropped = [], parsed.dropped
    for b in parsed.boxes:
        xs = sorted((_clip(b.x1 * sx, width), _clip(b.x2 * sx, width)))
        ys = sorted((_clip(b.y1 * sy, height), _clip(b.y2 * sy, height)))
        if not all(map(math.isfinite, xs + ys)) or xs[1] <= xs[0] or ys[1] <= ys[0] or \
                not math.isfinite(b.score):
            dropped += 1
            continue
        boxes.append(Box(b.label, xs[0], ys[0], xs[1], ys[1], b.score))
    return Parsed(boxes, dropped)


def _clip(value, limit):
    return min(max(value, 0.0), float(limit))


def locate(text: str, box_format: str, image_size: Tuple[int, int],
           seen_size: Optional[Tuple[int, int]] = None, default_label: str = '') -> Parsed:
    """Parse ``text`` and map its boxes to original-image pixels (see ``to_image``)."""
    return to_image(parse(text, default_label), box_format, image_size, seen_size)


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> Tuple[int, int]:
    """
    Return (height, width) as Qwen2-VL / Qwen2.5-VL processors resize an image.

    Each side is rounded to a multiple of ``factor`` (patch size x merge size), then both are
    scaled together into [min_pixels, max_pixels]. Sides already on that grid and within the
    budget come back unchanged, so an image sent at this size is not resized again by a
    server whose budget is at least as large. The default budget (1280 merged tokens) is the
    processors' built-in one, below what the published checkpoints configure (12845056).
    """
    if min(height, width) < 1:
        raise ValueError(f'image sides must be positive, got {height}x{width}')
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def family_template(info) -> str:
    """
    Return the grounding question template a family (its ``FamilyInfo``) was trained on.

    One family may declare it per checkpoint (Qwen2-VL and Qwen2.5-VL): pass the loaded
    family's ``info``. A family trained to locate nothing raises VlmError.
    """
    if not info.grounding_prompt:
        raise VlmError(f'{info.display_name} was not trained to locate objects')
    return info.grounding_prompt


def prompts(template: str, labels: Sequence[str]) -> List[Tuple[str, str]]:
    """
    Return ``[(label, question), ...]`` for a grounding prompt template.

    A template with ``{label}`` asks one question per label (as InternVL was trained); one
    with ``{labels}`` asks about all of them at once (comma-separated), with label ''.
    """
    labels = [label.strip() for label in labels if label.strip()]
    if '{labels}' in template:
        return [('', template.replace('{labels}', ', '.join(labels)))]
    if '{label}' not in template:
        raise ValueError("a grounding prompt template needs '{label}' or '{labels}'")
    return [(label, template.replace('{label}', label)) for label in labels]


def detect(answerer, images, questions: Sequence[Tuple[str, str]], system_prompt='',
           **kwargs) -> Result:
    """
    Ask each ``(label, question)`` about ``images`` with ``answerer``; one merged Result.

    Text is one line per question; a box without a label of its own takes its question's;
    token counts and timings add up. A cancelled question ends the run (finish_reason
    ``cancelled``). ``kwargs`` go to ``answerer.generate``.
    """
    results = []
    for label, question in questions:
        result = answerer.generate(images, question, system_prompt, **kwargs)
        result.detections = [b if b.label else dataclasses.replace(b, label=label)
                             for b in result.detections]
        results.append(result)
        if result.finish_reason == FINISH_CANCELLED:
            break
    last = results[-1]
    timings = Timings(**{name: sum(getattr(r.timings, name) for r in results)
                         for name in ('preprocess_ms', 'vision_ms', 'prefill_ms', 'decode_ms',
                                      'total_ms')})
    return Result(text='\n'.join(r.text for r in results), finish_reason=last.finish_reason,
                  token_ids=[t for r in results for t in r.token_ids],
                  prompt_tokens=sum(r.prompt_tokens for r in results),
                  image_tokens=sum(r.image_tokens for r in results), timings=timings,
                  cached_tokens=sum(r.cached_tokens for r in results), backend=last.backend,
                  completion_token_count=sum(r.completion_tokens for r in results),
                  detections=[b for r in results for b in r.detections],
                  dropped_boxes=sum(r.dropped_boxes for r in results))
