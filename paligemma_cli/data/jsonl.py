"""Read image/prefix/suffix datasets stored as JSON Lines, for fine-tuning and evaluation.

One object per line:

    {"image": "images/000000.png", "prefix": "caption en", "suffix": "a red circle", "task": "caption"}

`image` is relative to the jsonl file (or absolute). `suffix` is one string, or a list of strings
when an eval set has several acceptable references. `task` is optional. `negatives` is optional too:
captions that are close to the image's but wrong (e.g. its shapes in another order), which contrastive
training can use as hard negatives (`paligemma train --objective siglip --hard-negatives 1`). `mask`
is optional: an image of the object a `segment` line is about (any pixel above half is the object), the
ground truth `eval` scores masks against and `train --objective vqvae` learns from; relative to the
file, as `image`. Other keys are ignored.
Blank lines are skipped. Images are not opened here: a bad image is reported by whoever loads it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from paligemma_cli.errors import PaliGemmaError


@dataclass(frozen=True)
class Example:
    image: Path
    prefix: str
    suffix: str | list[str]
    task: str | None = None
    negatives: tuple[str, ...] = ()  # wrong captions of this image, for contrastive hard negatives
    mask: Path | None = None  # the object's mask image, for segment lines

    @property
    def references(self) -> list[str]:
        """The suffix as a list, so scoring code needn't care whether there is one reference."""
        return [self.suffix] if isinstance(self.suffix, str) else list(self.suffix)


def _parse(line: str, base: Path) -> Example:
    """One line -> Example; raises ValueError with what is wrong (the caller adds file and line)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise ValueError("expected a JSON object")
    missing = [k for k in ("image", "prefix", "suffix") if k not in obj]
    if missing:
        raise ValueError(f"missing key{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}")
    for key in ("image", "prefix"):
        if not isinstance(obj[key], str):
            raise ValueError(f"{key!r} must be a string")
    if not obj["image"]:
        raise ValueError("'image' is empty")
    suffix = obj["suffix"]
    if not (isinstance(suffix, str) or (isinstance(suffix, list) and suffix and all(isinstance(s, str) for s in suffix))):
        raise ValueError("'suffix' must be a string or a non-empty list of strings")
    task = obj.get("task")
    if task is not None and not isinstance(task, str):
        raise ValueError("'task' must be a string")
    negatives = obj.get("negatives", [])
    if not (isinstance(negatives, list) and all(isinstance(n, str) for n in negatives)):
        raise ValueError("'negatives' must be a list of strings")
    mask = obj.get("mask")
    if mask is not None and not (isinstance(mask, str) and mask):
        raise ValueError("'mask' must be a non-empty string (a mask image's path)")
    return Example(base / obj["image"], obj["prefix"], suffix, task, tuple(negatives),
                   base / mask if mask is not None else None)


def read_jsonl(path: str | Path) -> list[Example]:
    """All examples in `path`, image paths resolved against the file's folder.

    Raises PaliGemmaError naming the file and the 1-based line number of the first bad line.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PaliGemmaError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PaliGemmaError(f"{path}: cannot read ({e})") from None
    examples = []
    # split("\n"), not splitlines(): the latter also splits on U+2028 etc., legal inside JSON strings.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            examples.append(_parse(line, path.parent))
        except ValueError as e:
            raise PaliGemmaError(f"{path}:{number}: {e}") from None
    return examples


def caption_examples(examples: list[Example]) -> list[Example]:
    """The image-caption pairs of a dataset: lines whose `task` is "caption" or not given.

    A mixed task file (such as `paligemma demo-data`'s) also holds answers ("red", "2") and detections,
    which are not descriptions of the whole image.
    """
    return [ex for ex in examples if ex.task in (None, "caption")]
