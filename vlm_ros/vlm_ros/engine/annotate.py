"""Boxes drawn on the image they were found in (for viewers and the command line)."""

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from vlm_ros.engine.datatypes import Box

COLOUR = (255, 0, 255)
"""Magenta: rare in camera images and in the default model's scenes."""


def draw_boxes(rgb: np.ndarray, boxes: Sequence[Box]) -> np.ndarray:
    """Return a copy of ``rgb`` (uint8 RGB) with each box and its label drawn."""
    picture = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8))
    draw = ImageDraw.Draw(picture)
    width = max(1, round(max(rgb.shape[:2]) / 200))
    for b in boxes:
        draw.rectangle((b.x1, b.y1, b.x2, b.y2), outline=COLOUR, width=width)
        if b.label:
            draw.text((b.x1 + width + 1, b.y1 + width + 1), b.label, fill=COLOUR)
    return np.asarray(picture, dtype=np.uint8)
