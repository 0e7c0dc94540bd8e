"""Model answers drawn on the picture they are about: boxes with their labels, translucent masks."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageColor, ImageDraw, ImageFont

from paligemma_cli.processing.locations import Box

# Colours with enough contrast on photos; picked per label so one class keeps one colour.
_PALETTE = (
    "#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4",
    "#42d4f4", "#f032e6", "#bfef45", "#fabed4", "#469990",
)


def draw_boxes(image: Image.Image, boxes: list[Box], line_width: int = 3) -> Image.Image:
    """A copy of `image` with each box outlined and its label written on a filled tag above it."""
    out = image.convert("RGB")  # convert always copies, so the caller's image is left alone
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    colours: dict[str, str] = {}
    for box in boxes:
        colour = colours.setdefault(box.label, _PALETTE[len(colours) % len(_PALETTE)])
        draw.rectangle((box.x0, box.y0, box.x1, box.y1), outline=colour, width=line_width)
        left, top, right, bottom = draw.textbbox((0, 0), box.label, font=font)
        text_w, text_h = right - left, bottom - top
        # The tag sits above the box, or inside it when the box touches the top edge.
        tag_y = box.y0 - text_h - 4 if box.y0 - text_h - 4 >= 0 else box.y0
        draw.rectangle((box.x0, tag_y, box.x0 + text_w + 4, tag_y + text_h + 4), fill=colour)
        draw.text((box.x0 + 2 - left, tag_y + 2 - top), box.label, fill="white", font=font)
    return out


MASK_OPACITY = 0.45  # enough to see the mask, little enough to see what it covers


def draw_masks(image: Image.Image, objects: Sequence[tuple[str, tuple[int, int, int, int], np.ndarray]],
               line_width: int = 2) -> Image.Image:
    """A copy of `image` with each object's mask tinted in, then its box and label drawn as `draw_boxes` does.

    objects: (label, (x0, y0, x1, y1) with ends exclusive, boolean mask (H, W) of the image's size).
    One label keeps one colour, the same for its masks and its boxes.
    """
    out = image.convert("RGB")
    colours: dict[str, str] = {}
    pixels = np.asarray(out, dtype=np.float32).copy()
    for label, _, mask in objects:
        colour = colours.setdefault(label, _PALETTE[len(colours) % len(_PALETTE)])
        tint = np.array(ImageColor.getrgb(colour), dtype=np.float32)
        pixels[mask] = (1 - MASK_OPACITY) * pixels[mask] + MASK_OPACITY * tint
    out = Image.fromarray(pixels.round().astype(np.uint8), "RGB")
    # Pillow's rectangles include their far corner; the boxes here end one pixel before it.
    boxes = [Box(label, x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)) for label, (x0, y0, x1, y1), _ in objects]
    return draw_boxes(out, boxes, line_width)
