"""Scoring `segment` answers as big_vision scores its RefCOCO transfers.

Reference: big_vision `evaluators/proj/paligemma/transfers/segmentation.py` (`Evaluator.run`). Per
example, the first object of the answer is read; its tokens are valid when there are 4 loc and 16 seg
tokens in range with y1 > y0 and x1 > x0. Its mask is decoded, placed in the original image
(`processing.segmentation.paste_mask`) and compared with the ground-truth mask at full resolution:
IoU = I / (|gt| + |pred| - I), 0 for an invalid answer or one whose box truncates to no pixel.
The task's score is the **mean of the per-example IoUs** (not a pooled IoU). Box accuracy is the share
of examples whose box, in normalised coordinates, overlaps the ground truth's with IoU >= 0.5.

Ground truth: the line's `mask` image (pixels above half). A line without one falls back to the
reference answer's own tokens decoded by the same VQ-VAE, which measures agreement with the
reference rather than with a true mask. The ground-truth box comes from the reference's loc tokens,
else from the mask's extent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from paligemma_cli.data.jsonl import Example
from paligemma_cli.errors import PaliGemmaError
from paligemma_cli.inference.segmentation import MaskCodec
from paligemma_cli.processing.segmentation import MAX_BIN, mask_box, parse_object, paste_mask


def read_mask(path: Path, size: tuple[int, int]) -> np.ndarray:
    """A ground-truth mask image as a boolean (H, W) array of the image's `size` (width, height)."""
    try:
        with Image.open(path) as im:
            mask = np.asarray(im.convert("L")) > 127
    except (OSError, ValueError, SyntaxError) as e:
        raise PaliGemmaError(f"cannot read mask '{path}': {e}") from None
    if (mask.shape[1], mask.shape[0]) != tuple(size):
        raise PaliGemmaError(f"mask '{path}' is {mask.shape[1]}x{mask.shape[0]} but its image is {size[0]}x{size[1]}")
    return mask


def _box_iou(a, b) -> float:
    """IoU of two (y0, x0, y1, x1) boxes."""
    area = lambda y0, x0, y1, x1: max(x1 - x0, 0.0) * max(y1 - y0, 0.0)
    inter = area(max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    union = area(*a) + area(*b) - inter
    return inter / union if union > 0 else 0.0


def ground_truth(example: Example, size: tuple[int, int], codec: MaskCodec) -> tuple[np.ndarray, tuple]:
    """(boolean (H, W) mask, (y0, x0, y1, x1) normalised box) the example's answer is scored against."""
    width, height = size
    reference = parse_object(example.references[0].split(";")[0])
    if example.mask is not None:
        mask = read_mask(example.mask, size)
    elif reference is not None:
        mask = paste_mask(codec.decode_one(reference.codes), reference.bins, width, height)
    else:
        raise PaliGemmaError(f"segment example for '{example.image}' has no \"mask\" and its reference is not a "
                             "segmentation answer: there is nothing to score against")
    if reference is not None:
        box = tuple(b / MAX_BIN for b in reference.bins)
    else:
        box = mask_box(mask) or (0.0, 0.0, 0.0, 0.0)
    return mask, box


def segment_scores(prediction: str, example: Example, size: tuple[int, int], codec: MaskCodec) -> dict[str, float]:
    """{"iou", "box_iou", "valid"} of one answer, each in [0, 1] (see the module docstring)."""
    width, height = size
    gt_mask, gt_box = ground_truth(example, size, codec)
    obj = parse_object(prediction.split(";")[0])
    if obj is None:
        return {"iou": 0.0, "box_iou": 0.0, "valid": 0.0}
    box_iou = _box_iou(tuple(b / MAX_BIN for b in obj.bins), gt_box)
    x0, y0, x1, y1 = obj.pixel_box(width, height)
    if x1 <= x0 or y1 <= y0:  # valid tokens can still truncate to no pixel
        return {"iou": 0.0, "box_iou": box_iou, "valid": 0.0}
    pred = paste_mask(codec.decode_one(obj.codes), obj.bins, width, height)
    inter = int((pred & gt_mask).sum())
    union = int(gt_mask.sum()) + int(pred.sum()) - inter
    return {"iou": inter / union if union else 0.0, "box_iou": box_iou, "valid": 1.0}


def aggregate_segment_scores(scores: list[dict[str, float]]) -> dict[str, float]:
    """Percentages: mean per-example IoU, box accuracy at IoU >= 0.5, share of invalid answers."""
    n = len(scores)
    return {"miou": 100 * sum(s["iou"] for s in scores) / n,
            "boxacc": 100 * sum(s["box_iou"] >= 0.5 for s in scores) / n,
            "invalid": 100 * sum(1 - s["valid"] for s in scores) / n}
