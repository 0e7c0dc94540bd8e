"""Precision, recall and IoU of predicted boxes against ground truth, at one IoU threshold.

A quick, readable check for fine-tuning runs, not COCO mAP: PaliGemma's answers carry no
confidence scores to rank by, so a precision/recall pair at IoU 0.5 is what can be measured without
extra machinery. Matching is greedy by IoU (highest first), one-to-one, labels must agree, as in
the matching step of the PASCAL VOC / COCO evaluations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from paligemma_cli.processing.locations import Box


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes (continuous pixel coordinates); 0 if both are empty."""
    inter_w = min(a.x1, b.x1) - max(a.x0, b.x0)
    inter_h = min(a.y1, b.y1) - max(a.y0, b.y0)
    inter = max(0.0, inter_w) * max(0.0, inter_h)
    union = a.area + b.area - inter
    return inter / union if union > 0 else 0.0


@dataclass(frozen=True)
class DetectionScores:
    """precision = matched / predicted, recall = matched / ground truth, both in [0, 1];
    mean_iou: mean IoU of the matched pairs (0 if none)."""

    precision: float
    recall: float
    mean_iou: float
    num_predicted: int
    num_ground_truth: int
    num_matched: int


def _same_label(a: Box, b: Box) -> bool:
    # The model writes labels as the prompt spelled them; case and stray spaces should not count.
    return a.label.strip().lower() == b.label.strip().lower()


def match_boxes(
    pred: Sequence[Box], gt: Sequence[Box], iou: float = 0.5
) -> list[tuple[int, int, float]]:
    """Greedy one-to-one matches (pred index, gt index, IoU) with IoU >= `iou` and equal labels."""
    candidates = [
        (box_iou(p, g), i, j)
        for i, p in enumerate(pred)
        for j, g in enumerate(gt)
        if _same_label(p, g)
    ]
    # Ties broken by index so the result does not depend on sort stability across versions.
    candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
    used_pred, used_gt, matches = set(), set(), []
    for overlap, i, j in candidates:
        if overlap < iou or overlap == 0.0:
            break
        if i in used_pred or j in used_gt:
            continue
        used_pred.add(i)
        used_gt.add(j)
        matches.append((i, j, overlap))
    return matches


def detection_scores(
    pred_boxes_per_image: Sequence[Sequence[Box]],
    gt_boxes_per_image: Sequence[Sequence[Box]],
    iou: float = 0.5,
) -> DetectionScores:
    """Pool matches over all images, then take precision, recall and mean matched IoU.

    An empty denominator gives 0, except that with no predictions and no ground truth at all both
    precision and recall are 1 (nothing was missed and nothing was invented).
    """
    if len(pred_boxes_per_image) != len(gt_boxes_per_image):
        raise ValueError(
            f"{len(pred_boxes_per_image)} images of predictions but "
            f"{len(gt_boxes_per_image)} of ground truth"
        )
    overlaps = []
    num_pred = num_gt = 0
    for pred, gt in zip(pred_boxes_per_image, gt_boxes_per_image):
        num_pred += len(pred)
        num_gt += len(gt)
        overlaps += [overlap for _, _, overlap in match_boxes(pred, gt, iou)]
    matched = len(overlaps)
    if num_pred == 0 and num_gt == 0:
        precision = recall = 1.0
    else:
        precision = matched / num_pred if num_pred else 0.0
        recall = matched / num_gt if num_gt else 0.0
    return DetectionScores(
        precision=precision,
        recall=recall,
        mean_iou=sum(overlaps) / matched if matched else 0.0,
        num_predicted=num_pred,
        num_ground_truth=num_gt,
        num_matched=matched,
    )
