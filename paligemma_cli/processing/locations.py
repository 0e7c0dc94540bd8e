"""Boxes in PaliGemma's detection answers: parse, format, draw, compare.

A `detect cat ; dog` answer holds, per object, four location tokens and a label:
`<loc0123><loc0456><loc0789><loc1000> cat ; <loc...>... dog`. The tokens are y0, x0, y1, x1 as bins
0..1023 of the resized square image; a segmentation answer puts 16 `<segNNN>` tokens between the
locations and the label.

References: big_vision `big_vision/evaluators/proj/paligemma/transfers/detection.py` and
`big_vision/pp/proj/paligemma/` (encode `round(v * 1023)`, decode `bin / 1023` times the original
height/width); the PaliGemma paper (arXiv:2407.07726), section on location tokens.

Pure Python (Pillow only for drawing), so the CLI can use it without torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

NUM_BINS = 1024
_MAX_BIN = NUM_BINS - 1

# One object: some loc tokens, maybe seg tokens, then the label. The count of loc tokens is checked
# after matching, so that a piece with 3 or 5 of them is skipped rather than half-read.
_OBJECT = re.compile(r"^((?:<loc\d+>)+)((?:<seg\d+>)*)\s*(.*?)\s*$", re.DOTALL)
_LOC = re.compile(r"<loc(\d+)>")

# Colours with enough contrast on photos; picked per label so one class keeps one colour.
_PALETTE = (
    "#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4",
    "#42d4f4", "#f032e6", "#bfef45", "#fabed4", "#469990",
)


@dataclass(frozen=True)
class Box:
    """One detected (or ground-truth) object.

    x0, y0, x1, y1: corners in pixels of the original image (x right, y down).
    bins: the model's (y0, x0, y1, x1) location bins, 0..1023, in token order; None for boxes that
        did not come from model output (ground truth).
    """

    label: str
    x0: float
    y0: float
    x1: float
    y1: float
    bins: tuple[int, int, int, int] | None = None

    @property
    def area(self) -> float:
        return max(0.0, self.x1 - self.x0) * max(0.0, self.y1 - self.y0)


def parse_detections(text: str, width: int, height: int) -> list[Box]:
    """Read the boxes out of a detection (or segmentation) answer.

    Args:
        text: the decoded model output, objects separated by `;`.
        width, height: size of the original image in pixels; bins are scaled to it.

    Returns:
        The well-formed objects in order. A piece without exactly four loc tokens at its start, with
        a bin above 1023, with y1 <= y0 or x1 <= x0, or without a label is skipped: a model's output
        is not trusted to be well formed, and one bad object should not lose the others.
    """
    boxes = []
    for piece in text.split(";"):
        match = _OBJECT.match(piece.strip())
        if match is None:
            continue
        bins = [int(b) for b in _LOC.findall(match.group(1))]
        label = match.group(3)
        if len(bins) != 4 or not label or "<loc" in label or "<seg" in label:
            continue
        if any(b > _MAX_BIN for b in bins):
            continue
        y0, x0, y1, x1 = bins
        if y1 <= y0 or x1 <= x0:
            continue
        boxes.append(
            Box(
                label=label,
                x0=x0 / _MAX_BIN * width,
                y0=y0 / _MAX_BIN * height,
                x1=x1 / _MAX_BIN * width,
                y1=y1 / _MAX_BIN * height,
                bins=(y0, x0, y1, x1),
            )
        )
    return boxes


def _to_bin(value: float, size: int) -> int:
    return min(_MAX_BIN, max(0, round(value / size * _MAX_BIN)))


def format_detections(boxes: list[Box], width: int, height: int) -> str:
    """The answer the model should give for `boxes`: the inverse of `parse_detections`.

    Used to build training targets. Coordinates are clamped to the image, so a box that sticks out
    still encodes to valid tokens.
    """
    objects = []
    for box in boxes:
        y0, x0 = _to_bin(box.y0, height), _to_bin(box.x0, width)
        y1, x1 = _to_bin(box.y1, height), _to_bin(box.x1, width)
        objects.append(f"<loc{y0:04d}><loc{x0:04d}><loc{y1:04d}><loc{x1:04d}> {box.label}")
    return " ; ".join(objects)


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes (continuous pixel coordinates); 0 if both are empty."""
    inter_w = min(a.x1, b.x1) - max(a.x0, b.x0)
    inter_h = min(a.y1, b.y1) - max(a.y0, b.y0)
    inter = max(0.0, inter_w) * max(0.0, inter_h)
    union = a.area + b.area - inter
    return inter / union if union > 0 else 0.0


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
