"""Boxes in PaliGemma's detection answers: parse and format.

A `detect cat ; dog` answer holds, per object, four location tokens and a label:
`<loc0123><loc0456><loc0789><loc1000> cat ; <loc...>... dog`. The tokens are y0, x0, y1, x1 as bins
0..1023 of the resized square image; a segmentation answer puts 16 `<segNNN>` tokens between the
locations and the label.

References: big_vision `big_vision/evaluators/proj/paligemma/transfers/detection.py` and
`big_vision/pp/proj/paligemma/` (encode `round(v * 1023)`, decode `bin / 1023` times the original
height/width); the PaliGemma paper (arXiv:2407.07726), section on location tokens.

Pure Python, so the CLI can use it without torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

NUM_BINS = 1024
_MAX_BIN = NUM_BINS - 1

# One object: some loc tokens, maybe seg tokens, then the label. The count of loc tokens is checked
# after matching, so that a piece with 3 or 5 of them is skipped rather than half-read.
_OBJECT = re.compile(r"^((?:<loc\d+>)+)((?:<seg\d+>)*)\s*(.*?)\s*$", re.DOTALL)
_LOC = re.compile(r"<loc(\d+)>")
_SEG = re.compile(r"<seg(\d+)>")


@dataclass(frozen=True)
class Box:
    """One detected (or ground-truth) object.

    x0, y0, x1, y1: corners in pixels of the original image (x right, y down).
    bins: the model's (y0, x0, y1, x1) location bins, 0..1023, in token order; None for boxes that
        did not come from model output (ground truth).
    seg: a segmentation answer's `<segNNN>` codes (0..127) for this object, in order: the mask's
        VQ-VAE code, which big_vision's decoder turns into a mask; None when the answer had none.
    """

    label: str
    x0: float
    y0: float
    x1: float
    y1: float
    bins: tuple[int, int, int, int] | None = None
    seg: tuple[int, ...] | None = None

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
                seg=tuple(int(c) for c in _SEG.findall(match.group(2))) or None,
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
