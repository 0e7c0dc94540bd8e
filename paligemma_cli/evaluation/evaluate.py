"""Score a model on an image/prefix/suffix dataset, per task, with the metrics the papers report.

Each example belongs to a task: its `task` field when the dataset has one (the shapes world names
"color", "count", "spatial", "caption", "detect"), else one inferred from the prefix ("vqa",
"caption", "detect", "other"). The prefix decides which metrics apply:

    answer ...               -> exact match and VQA accuracy          (vqa_metrics)
    caption ... / describe   -> exact match, BLEU-4 and CIDEr-D       (caption_metrics)
    detect ...               -> detect accuracy, precision and recall at IoU >= 0.5, mean IoU
                                                                      (detection_metrics)
    segment ...              -> mean per-example mask IoU, box accuracy at IoU >= 0.5, share of
                                invalid answers, as big_vision scores RefCOCO (segmentation.py;
                                needs the VQ-VAE that decodes the masks)
    anything else            -> exact match

Aggregate scores are percentages (the papers' scale). Generation (`evaluate`) is kept apart from
scoring (`score`, `score_example`), so the metrics can be tested, or re-run on saved predictions,
without a model.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from paligemma_cli.data.jsonl import Example
from paligemma_cli.errors import PaliGemmaError
from paligemma_cli.evaluation.boxes import detection_scores, match_boxes
from paligemma_cli.evaluation.captions import cider_d, corpus_bleu, tokenize_caption
from paligemma_cli.evaluation.segmentation import aggregate_segment_scores, segment_scores
from paligemma_cli.evaluation.vqa import exact_match as vqa_exact_match
from paligemma_cli.evaluation.vqa import vqa_accuracy
from paligemma_cli.processing.image import load_image
from paligemma_cli.processing.locations import Box, parse_detections

VQA, CAPTION, DETECT, SEGMENT, EXACT = "vqa", "caption", "detect", "segment", "exact"
_KIND_OF_PROMPT = {"answer": VQA, "caption": CAPTION, "describe": CAPTION, "detect": DETECT, "segment": SEGMENT}
# The task name given to an example without a `task` field, by kind.
_INFERRED_NAME = {VQA: "vqa", CAPTION: "caption", DETECT: "detect", SEGMENT: "segment", EXACT: "other"}

# Metric keys in display order; every aggregate is a percentage.
METRICS = ("exact_match", "vqa_accuracy", "bleu4", "cider", "accuracy", "precision", "recall", "mean_iou",
           "miou", "boxacc", "invalid")


def task_kind(prefix: str) -> str:
    """Which metrics fit a prefix, from its first word: "vqa", "caption", "detect", "segment" or "exact"."""
    words = prefix.strip().lower().split(maxsplit=1)
    return _KIND_OF_PROMPT.get(words[0], EXACT) if words else EXACT


def task_name(example: Example) -> str:
    """The example's `task` field, or a name inferred from its prefix."""
    return example.task or _INFERRED_NAME[task_kind(example.prefix)]


@dataclass
class TaskResult:
    """Aggregate scores of one task. metrics: name -> percentage (keys from METRICS)."""

    name: str
    kind: str
    n: int
    metrics: dict[str, float]


@dataclass
class ScoredExample:
    """One example as evaluated: the model's answer and its own score, or why it was skipped.

    score holds per-example values in [0, 1] (exact_match, vqa_accuracy; for detection: accuracy,
    and the matched/predicted/ground_truth box counts; for segmentation: iou, box_iou, valid). Empty
    when `error` is set. size is the image's (width, height), which places boxes when the task is scored.
    """

    example: Example
    task: str
    prediction: str | None
    score: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    size: tuple[int, int] | None = None

    def as_record(self) -> dict:
        """The line written to `--predictions`."""
        ex = self.example
        record = {"image": str(ex.image), "prefix": ex.prefix, "task": self.task,
                  "references": ex.references, "prediction": self.prediction, "score": self.score}
        if self.error is not None:
            record["error"] = self.error
        return record


@dataclass
class EvalReport:
    tasks: dict[str, TaskResult]
    examples: list[ScoredExample]
    seconds: float = 0.0

    @property
    def n(self) -> int:
        """How many examples were scored (unreadable images excluded)."""
        return sum(1 for e in self.examples if e.error is None)

    @property
    def skipped(self) -> list[ScoredExample]:
        return [e for e in self.examples if e.error is not None]


# --- per-example scores -------------------------------------------------------------------------


def _vqa_score(prediction: str, references: list[str]) -> float:
    # VQA accuracy wants 3 annotators to agree. A list of one or two references is a set of
    # acceptable answers, not annotator votes (`vqa_accuracy` would cap a right answer at 1/3 or
    # 2/3), so there a match with any of them counts in full.
    if len(references) < 3:
        return vqa_exact_match(prediction, references)
    return vqa_accuracy(prediction, references)


def _caption_exact(prediction: str, references: list[str]) -> float:
    # Equal after the caption metrics' own tokenisation: case and punctuation do not count.
    tokens = tokenize_caption(prediction)
    return float(any(tokenize_caption(r) == tokens for r in references))


def _plain_exact(prediction: str, references: list[str]) -> float:
    # Unknown tasks (OCR, say) may care about case, so only runs of whitespace are forgiven.
    said = " ".join(prediction.split())
    return float(any(" ".join(r.split()) == said for r in references))


def _match_detections(prediction: str, references: list[str], size: tuple[int, int]):
    """(predicted boxes, reference boxes, matches) against the reference that fits best.

    Several references are alternatives: the one with an exact fit wins, then the one with most
    matches, then the one with fewest unmatched boxes on either side.
    """
    width, height = size
    pred = parse_detections(prediction, width, height)
    best = None
    for reference in references:
        gt = parse_detections(reference, width, height)
        matches = match_boxes(pred, gt, iou=0.5)
        m = len(matches)
        key = (m == len(pred) == len(gt), m, -(len(pred) + len(gt) - 2 * m))
        if best is None or key > best[0]:
            best = (key, gt, matches)
    return pred, best[1], best[2]


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) as `load_image` will see it, from the header only."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # only the header is read
            with Image.open(path) as im:
                width, height = im.size
                # EXIF orientations 5-8 are quarter turns: load_image stands the picture upright.
                if im.getexif().get(0x0112) in (5, 6, 7, 8):
                    width, height = height, width
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise PaliGemmaError(f"cannot read image '{path}': {e}") from None
    return width, height


def _need_codec(codec):
    if codec is None:
        raise PaliGemmaError("scoring segment answers needs the VQ-VAE that decodes their masks (eval --vae)")
    return codec


def score_example(prediction: str, example: Example, size: tuple[int, int] | None = None,
                  codec=None) -> dict[str, float]:
    """The example's own score, each value in [0, 1] (box counts for detection).

    size: (width, height) of the image, needed for detection and segmentation only; read from the
    file when None. codec: the `MaskCodec` segmentation answers are decoded with.
    """
    refs = example.references
    kind = task_kind(example.prefix)
    if kind == SEGMENT:
        return segment_scores(prediction, example, size or _image_size(example.image), _need_codec(codec))
    if kind == VQA:
        return {"exact_match": vqa_exact_match(prediction, refs), "vqa_accuracy": _vqa_score(prediction, refs)}
    if kind == CAPTION:
        return {"exact_match": _caption_exact(prediction, refs)}
    if kind == DETECT:
        pred, gt, matches = _match_detections(prediction, refs, size or _image_size(example.image))
        exact = len(matches) == len(pred) == len(gt)
        return {"accuracy": float(exact), "matched": len(matches), "predicted": len(pred), "ground_truth": len(gt)}
    return {"exact_match": _plain_exact(prediction, refs)}


# --- aggregate scores ---------------------------------------------------------------------------


def _mean(values: list[float]) -> float:
    return 100 * sum(values) / len(values)


def _aggregate(kind: str, predictions: list[str], examples: list[Example], sizes: list, codec=None,
               scores: list[dict[str, float]] | None = None) -> dict[str, float]:
    refs = [e.references for e in examples]
    if kind == SEGMENT:
        # The mean of per-example values: those `evaluate` already took are reused, not decoded again.
        return aggregate_segment_scores(scores or [segment_scores(p, e, size or _image_size(e.image), _need_codec(codec))
                                                   for p, e, size in zip(predictions, examples, sizes)])
    if kind == VQA:
        return {"exact_match": _mean([vqa_exact_match(p, r) for p, r in zip(predictions, refs)]),
                "vqa_accuracy": _mean([_vqa_score(p, r) for p, r in zip(predictions, refs)])}
    if kind == CAPTION:
        # BLEU and CIDEr-D are corpus scores (CIDEr's IDF comes from the whole set), so they are
        # taken over the task's examples together, never averaged from per-example values.
        return {"exact_match": _mean([_caption_exact(p, r) for p, r in zip(predictions, refs)]),
                "bleu4": corpus_bleu(predictions, refs), "cider": cider_d(predictions, refs)}
    if kind == DETECT:
        preds: list[list[Box]] = []
        gts: list[list[Box]] = []
        exact = []
        for p, e, size in zip(predictions, examples, sizes):
            pred, gt, matches = _match_detections(p, e.references, size or _image_size(e.image))
            preds.append(pred)
            gts.append(gt)
            exact.append(float(len(matches) == len(pred) == len(gt)))
        # Precision and recall pool the boxes of all images, as detection_scores does.
        pooled = detection_scores(preds, gts, iou=0.5)
        return {"accuracy": _mean(exact), "precision": 100 * pooled.precision,
                "recall": 100 * pooled.recall, "mean_iou": 100 * pooled.mean_iou}
    return {"exact_match": _mean([_plain_exact(p, r) for p, r in zip(predictions, refs)])}


def score(
    predictions: Sequence[str],
    examples: Sequence[Example],
    sizes: Sequence[tuple[int, int] | None] | None = None,
    codec=None,
    scores: Sequence[dict[str, float]] | None = None,
) -> dict[str, TaskResult]:
    """Per-task aggregate scores of `predictions[i]` as the answer to `examples[i]`.

    Args:
        predictions: one model answer per example.
        examples: the examples, with their references.
        sizes: (width, height) of each image, used to place detection boxes and masks in pixels; read
            from the image files (header only) where missing.
        codec: the `MaskCodec` (VQ-VAE) that decodes segmentation answers; needed only for them.
        scores: each example's `score_example` values when they were taken already (as `evaluate`
            takes them), so that a task scored as their mean does not score its examples twice.

    Returns:
        task name -> TaskResult, in order of first appearance. A task whose examples mix prompt
        kinds (a dataset's own "task" naming both answers and captions) is split as "task/kind".
    """
    if len(predictions) != len(examples):
        raise ValueError(f"{len(predictions)} predictions but {len(examples)} examples")
    sizes = list(sizes) if sizes is not None else [None] * len(examples)
    groups: dict[tuple[str, str], list[int]] = {}
    for i, example in enumerate(examples):
        groups.setdefault((task_name(example), task_kind(example.prefix)), []).append(i)
    kinds_per_name: dict[str, int] = {}
    for name, _ in groups:
        kinds_per_name[name] = kinds_per_name.get(name, 0) + 1

    results = {}
    for (name, kind), idx in groups.items():
        label = name if kinds_per_name[name] == 1 else f"{name}/{kind}"
        metrics = _aggregate(kind, [predictions[i] for i in idx], [examples[i] for i in idx], [sizes[i] for i in idx],
                             codec, [scores[i] for i in idx] if scores is not None else None)
        results[label] = TaskResult(label, kind, len(idx), metrics)
    return results


# --- generation ---------------------------------------------------------------------------------


def select_examples(examples: list[Example], tasks: Sequence[str] = (), limit: int | None = None) -> list[Example]:
    """The examples of the named tasks (all when none are named), then the first `limit` of them."""
    if tasks:
        present = list(dict.fromkeys(task_name(e) for e in examples))
        unknown = [t for t in tasks if t not in present]
        if unknown:
            raise PaliGemmaError(f"no examples of task {', '.join(map(repr, unknown))}; "
                                 f"this dataset has {', '.join(present) or 'none'}")
        examples = [e for e in examples if task_name(e) in tasks]
    return examples[:limit] if limit is not None else examples


def evaluate(
    pipeline,
    examples: Sequence[Example],
    opts,
    batch_size: int = 16,
    on_progress: Callable[[list[ScoredExample]], None] | None = None,
    codec=None,
) -> EvalReport:
    """Answer every example with the model, batched, and score the answers per task.

    Args:
        pipeline: a loaded `Pipeline` (anything with `generate(images, prompts, opts)`).
        examples: what to evaluate.
        opts: SamplingOptions; evaluation is normally greedy.
        batch_size: examples per `generate` call.
        on_progress: called after each batch with that batch's ScoredExamples (skipped ones
            included), so a caller can write records and advance a progress bar as they come.
        codec: the `MaskCodec` that decodes `segment` answers (needed only when there are some).

    An image that cannot be read is recorded with its error and left out of the scores; it does
    not stop the run.
    """
    if codec is None and any(task_kind(e.prefix) == SEGMENT for e in examples):
        _need_codec(codec)  # before any generation, not at the first segment answer
    t0 = time.perf_counter()
    done: list[ScoredExample] = []
    for start in range(0, len(examples), batch_size):
        batch: list[ScoredExample] = []
        images, ready = [], []
        for example in examples[start:start + batch_size]:
            item = ScoredExample(example, task_name(example), prediction=None)
            batch.append(item)
            try:
                images.append(load_image(example.image))
                ready.append(item)
            except PaliGemmaError as e:
                item.error = str(e)
        if images:
            answers = pipeline.generate(images, [item.example.prefix for item in ready], opts)
            for item, image, answer in zip(ready, images, answers):
                item.prediction = answer
                item.score = score_example(answer, item.example, image.size, codec)
                item.size = image.size
        done += batch
        if on_progress is not None:
            on_progress(batch)
    return report_of(done, time.perf_counter() - t0, codec)


def report_of(items: list[ScoredExample], seconds: float = 0.0, codec=None) -> EvalReport:
    """The report of examples answered already (in one process, or gathered from several): every task
    scored over all its examples together, as corpus metrics need."""
    scored = [item for item in items if item.error is None]
    tasks = (score([s.prediction for s in scored], [s.example for s in scored], [s.size for s in scored], codec,
                   [s.score for s in scored]) if scored else {})
    return EvalReport(tasks, items, seconds=seconds)
