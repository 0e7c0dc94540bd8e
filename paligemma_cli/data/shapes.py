"""The "shapes world": synthetic scenes for training and evaluating the built-in demo model.

A scene is 1-3 non-overlapping flat shapes on a white background. Every shape in a scene has its own
type (circle, square, triangle) and its own colour, so "the circle" and "the red one" always name
exactly one object and every question has exactly one right answer. Scenes are small enough for a
~5M-parameter PaliGemma with 64 px images and 8 px patches to learn.

Each scene yields examples in PaliGemma's task prompts (architecture spec, "Tasks and structured outputs"):

    caption en                              -> "a red circle and a blue square"   (left to right;
                                               negatives: ["a blue square and a red circle"])
    answer en what color is the circle?     -> "red"
    answer en how many shapes are there?    -> "2"
    answer en is the circle left of the square?  -> "yes" / "no"
    detect circle                           -> "<loc0123><loc0456><loc0789><loc0999> circle"

and, only when asked for (`tasks=["segment"]`; they are not in the default mix, so the default data is
what it always was):

    segment circle                          -> "<loc0123><loc0456><loc0789><loc0999><seg012>...<seg077> circle"
                                               (+ "mask": the circle's pixels, the ground truth `eval` scores)
    mask (for training the VQ-VAE)          -> the line's image is one shape's mask, white on black

The 16 `<seg>` codes are the VQ-VAE encoder's tokens for the shape's mask cropped to its box and stretched
to 64x64 (big_vision's `refcoco_mask2str`), so a segment example needs a mask encoder (`encode_mask`); its
location bins sit at pixel centres (see `segment_example`).

Everything is a pure function of (seed, index): example i of a dataset does not depend on how many
examples are written, so `--n 100` is a prefix of `--n 1000` with the same seed.
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from paligemma_cli.outputs import mark_folder
from paligemma_cli.processing.locations import Box, format_detections
from paligemma_cli.processing.segmentation import format_segmentation

# (whole-image boolean mask, box (y0, x0, y1, x1) normalised) -> the 16 `<seg>` codes of the box's content
MaskEncoder = Callable[[np.ndarray, tuple[float, float, float, float]], Sequence[int]]

SHAPES = ("circle", "square", "triangle")

# Saturated colours far apart in RGB, so no two can be confused even after a bicubic resize.
COLORS = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (240, 220, 0),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "purple": (140, 50, 200),
}
BACKGROUND = (255, 255, 255)

MIN_SHAPES, MAX_SHAPES = 1, len(SHAPES)  # distinct types per scene caps the count at len(SHAPES)

# Shape side as a fraction of the image: 19..29 px at 64 px, i.e. 2.5-3.5 patches of 8 px. At 14 px a circle
# and a square differ by a few corner pixels inside one patch; a 5M model trained for an hour then knew each
# colour but not which shape wore it (every colour error named another shape's colour).
MIN_SIDE, MAX_SIDE = 0.30, 0.45
GAP = 2  # empty pixels kept between any two shapes' boxes, so blobs never touch

# Fixed task mix, as a repeating block of 10 so the proportions are exact in every 10 examples:
# detect 30%, caption 20%, color 20%, spatial 20%, count 10%.
TASK_CYCLE = ("detect", "caption", "color", "spatial", "detect", "count", "color", "caption", "spatial", "detect")


@dataclass(frozen=True)
class Shape:
    """One drawn shape. `box` is the tight pixel box (x0, y0, x1, y1), x1/y1 exclusive."""

    kind: str
    color: str
    box: tuple[int, int, int, int]

    @property
    def center_x(self) -> float:
        return (self.box[0] + self.box[2]) / 2


@dataclass(frozen=True)
class Scene:
    """A square image of side `size` holding `shapes`, sorted left to right by box centre."""

    size: int
    shapes: tuple[Shape, ...]

    def find(self, kind: str) -> Shape:
        return next(s for s in self.shapes if s.kind == kind)


# ---------------------------------------------------------------------------------------------
# Drawing and layout


def _draw(draw: ImageDraw.ImageDraw, kind: str, x: int, y: int, side: int, fill) -> None:
    """Draw one shape filling the square [x, x+side) x [y, y+side).

    Each kind touches all four sides of that square (tests check it for every side up to 255 px),
    so the square is also the shape's tight bounding box and the detect answer is exact.
    """
    x1, y1 = x + side - 1, y + side - 1  # Pillow's boxes are inclusive
    if kind == "circle":
        draw.ellipse((x, y, x1, y1), fill=fill)
    elif kind == "square":
        draw.rectangle((x, y, x1, y1), fill=fill)
    elif kind == "triangle":  # isosceles, pointing up: the box centre is always inside it
        draw.polygon([(x, y1), (x1, y1), ((x + x1) / 2, y)], fill=fill)
    else:
        raise ValueError(f"unknown shape {kind!r}")


def _apart(a: tuple, b: tuple) -> bool:
    """Boxes separated by at least GAP empty pixels horizontally or vertically."""
    return a[2] + GAP <= b[0] or b[2] + GAP <= a[0] or a[3] + GAP <= b[1] or b[3] + GAP <= a[1]


def _clearly_left(a: Shape, b: Shape) -> bool:
    """`a` is unambiguously left of `b`: each centre lies outside the other's horizontal extent."""
    return a.center_x < b.box[0] and b.center_x > a.box[2]


def random_scene(rng: random.Random, size: int = 64, min_shapes: int = MIN_SHAPES) -> Scene:
    """Sample a scene; layouts that break the rules are redrawn, so any rng state gives a valid one.

    Rules: shapes never touch, and of any two shapes one is clearly left of the other — the caption
    order and the spatial answers depend on that and must not be a matter of a pixel.
    """
    count = rng.randint(min_shapes, MAX_SHAPES)  # fixed before retries, so crowded scenes aren't rarer
    while True:
        kinds = rng.sample(SHAPES, count)
        colors = rng.sample(sorted(COLORS), count)
        shapes: list[Shape] = []
        for kind, color in zip(kinds, colors):
            for _ in range(50):
                side = rng.randint(round(MIN_SIDE * size), round(MAX_SIDE * size))
                x, y = rng.randint(0, size - side), rng.randint(0, size - side)
                shape = Shape(kind, color, (x, y, x + side, y + side))
                if all(_apart(shape.box, o.box) for o in shapes) and all(
                    _clearly_left(*sorted((shape, o), key=lambda s: s.center_x)) for o in shapes
                ):
                    shapes.append(shape)
                    break
            else:
                break  # no room left for this shape: start the scene over
        if len(shapes) == count:
            return Scene(size, tuple(sorted(shapes, key=lambda s: s.center_x)))


def make_scene(seed: int, index: int = 0, size: int = 64, min_shapes: int = MIN_SHAPES) -> Scene:
    """Scene number `index` of the stream for `seed`, independent of every other index."""
    # A string seed goes through SHA-512 in `random`, so it is stable across runs and Python builds.
    return random_scene(random.Random(f"shapes:{seed}:{index}"), size, min_shapes)


def shape_mask(scene: Scene, shape: Shape) -> np.ndarray:
    """The pixels of `shape` in the rendered scene, as a boolean (size, size) mask: drawn alone, the same way."""
    image = Image.new("L", (scene.size, scene.size), 0)
    x0, y0, x1, _ = shape.box
    _draw(ImageDraw.Draw(image), shape.kind, x0, y0, x1 - x0, 255)
    return np.asarray(image) > 0


def render(scene: Scene) -> Image.Image:
    """The scene as an RGB image of side `scene.size`, without anti-aliasing: every pixel is either
    the background or exactly one shape's colour."""
    image = Image.new("RGB", (scene.size, scene.size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for s in scene.shapes:
        x0, y0, x1, _ = s.box
        _draw(draw, s.kind, x0, y0, x1 - x0, COLORS[s.color])
    return image


# ---------------------------------------------------------------------------------------------
# Text: captions and examples


def _a(color: str, kind: str) -> str:
    return f"{'an' if color[0] in 'aeiou' else 'a'} {color} {kind}"


def caption(scene: Scene) -> str:
    """Canonical caption, shapes left to right: "a red circle, a blue square and an orange triangle"."""
    return _list_shapes(scene.shapes)


def _list_shapes(shapes: Sequence[Shape]) -> str:
    parts = [_a(s.color, s.kind) for s in shapes]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def reordered_captions(scene: Scene) -> list[str]:
    """The captions of the scene's shapes in every other left-to-right order: wrong, yet made of the
    right words, so a dual encoder can only tell them apart by where each shape is."""
    own = caption(scene)
    return [c for c in dict.fromkeys(map(_list_shapes, itertools.permutations(scene.shapes))) if c != own]


def scene_examples(scene: Scene) -> list[dict]:
    """Every example the scene supports, in a fixed order: [{"prefix", "suffix", "task"}, ...].

    The caption line also lists `negatives` (its shapes in other orders) when the scene has any."""
    ex = [{"prefix": "caption en", "suffix": caption(scene), "task": "caption"}]
    if negatives := reordered_captions(scene):
        ex[0]["negatives"] = negatives
    for s in scene.shapes:
        ex.append({"prefix": f"answer en what color is the {s.kind}?", "suffix": s.color, "task": "color"})
    ex.append({"prefix": "answer en how many shapes are there?", "suffix": str(len(scene.shapes)), "task": "count"})
    for a in scene.shapes:
        for b in scene.shapes:
            if a is not b:
                answer = "yes" if a.center_x < b.center_x else "no"
                ex.append({"prefix": f"answer en is the {a.kind} left of the {b.kind}?", "suffix": answer, "task": "spatial"})
    for s in scene.shapes:
        target = format_detections([Box(s.kind, *s.box)], scene.size, scene.size)
        ex.append({"prefix": f"detect {s.kind}", "suffix": target, "task": "detect"})
    return ex


def segment_example(scene: Scene, shape: Shape, encode_mask: MaskEncoder) -> tuple[dict, np.ndarray]:
    """(`segment <kind>` example, the shape's mask): the box's location tokens, the 16 codes
    `encode_mask` gives the mask's box content, then the label.

    The location bins are those of the box's pixel centres, not of its edges as `detect` writes them:
    big_vision places a mask at int(bin / 1023 * size), and on a 64-pixel image an edge binned with
    round(edge * 1023) lands just below its pixel half the time, so every answer, even a perfect one,
    would lose a pixel row or column (about 10 IoU points on these 19-29 pixel shapes). A bin at the
    pixel's centre truncates to that pixel, with half a pixel to spare either way."""
    mask = shape_mask(scene, shape)
    x0, y0, x1, y1 = shape.box
    size = scene.size
    crop = (y0 / size, x0 / size, y1 / size, x1 / size)
    codes = encode_mask(mask, crop)
    centres = tuple((v + 0.5) / size for v in (y0, x0, y1, x1))  # x1, y1 are exclusive: the pixel after the box
    return {"prefix": f"segment {shape.kind}", "suffix": format_segmentation(centres, codes, shape.kind),
            "task": "segment"}, mask


TASKS = tuple(dict.fromkeys(TASK_CYCLE))
# Tasks written only when named: each example of them also writes a mask image.
MASK_TASKS = ("segment", "mask")


def task_cycle(tasks: Sequence[str] | None = None) -> tuple[str, ...]:
    """TASK_CYCLE kept to `tasks` (in their proportions to each other); all of it for None.

    `segment` and `mask` join as many slots as `detect` has (3 of 13 in a mix of every task), or fill
    the cycle alone. `all` is every task the model answers: the default mix, every other example, and
    `segment` in between (the demo model learns segmentation on top of what it knows: the new task
    needs the bulk of the examples, the others enough to stay learnt)."""
    if tasks is None:
        return TASK_CYCLE
    if "all" in tasks:
        if set(tasks) != {"all"}:
            raise ValueError("all is every task already: give it alone")
        return tuple(t for task in TASK_CYCLE for t in (task, "segment"))
    unknown = sorted(set(tasks) - set(TASKS) - set(MASK_TASKS))
    if unknown or not tasks:
        what = f"unknown task(s) {', '.join(unknown)}" if unknown else "no task given"
        raise ValueError(f"{what}; choose from {', '.join(TASKS + MASK_TASKS)} or all")
    cycle = tuple(t for t in TASK_CYCLE if t in tasks)
    for extra in MASK_TASKS:
        if extra in tasks:
            cycle += (extra,) * TASK_CYCLE.count("detect")
    return cycle


def task_for(index: int, cycle: tuple[str, ...] = TASK_CYCLE) -> str:
    return cycle[index % len(cycle)]


def make_example(seed: int, index: int, size: int = 64, cycle: tuple[str, ...] = TASK_CYCLE,
                 encode_mask: MaskEncoder | None = None) -> tuple[Scene, dict]:
    """Example number `index` of the dataset for `seed`: its own scene and one question about it.

    Scene `index` depends only on the seed, the index and whether the task needs two shapes, so a
    captions-only file (`cycle=("caption",)`) shows the scenes `make_scene(seed, i)`. A `segment` or
    `mask` example is about the shape its prefix names (`segment circle`); see `shape_mask`."""
    task = task_for(index, cycle)
    # A spatial question needs two shapes; asking for them here keeps the task mix exact.
    scene = make_scene(seed, index, size, min_shapes=2 if task == "spatial" else MIN_SHAPES)
    pick = random.Random(f"pick:{seed}:{index}")
    if task == "mask":
        shape = pick.choice(scene.shapes)
        return scene, {"prefix": f"segment {shape.kind}", "suffix": shape.kind, "task": "mask"}
    if task == "segment":
        if encode_mask is None:
            raise ValueError("segment examples need a mask encoder (a VQ-VAE) for their <seg> codes")
        return scene, segment_example(scene, pick.choice(scene.shapes), encode_mask)[0]
    choices = [e for e in scene_examples(scene) if e["task"] == task]
    return scene, pick.choice(choices)


def write_dataset(
    out_dir: str | Path,
    n: int,
    seed: int,
    image_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
    tasks: Sequence[str] | None = None,
    encode_mask: MaskEncoder | None = None,
) -> Path:
    """Write `n` examples, one scene image each, to `out_dir`; return the path of `data.jsonl`.

    Layout: `images/000000.png`, ... and `data.jsonl` with one line per example:
    `{"image": "images/000000.png", "prefix": ..., "suffix": ..., "task": ...}` (image path relative
    to the jsonl). Tasks follow TASK_CYCLE, kept to `tasks` when given (e.g. ["caption"] for
    image-caption pairs). A `segment` example also writes `masks/000000.png` (its shape's pixels, white
    on black) and names it in `"mask"`; its codes come from `encode_mask`. A `mask` example's image is
    that mask itself (data for `train --objective vqvae`). Written one example at a time, never all
    in memory; `progress(done, n)` is called after each. Same arguments -> byte-identical data.jsonl
    and PNGs.
    """
    cycle = task_cycle(tasks)  # a bad task list fails before anything is written
    if "segment" in cycle and encode_mask is None:
        raise ValueError("segment examples need a mask encoder (a VQ-VAE) for their <seg> codes")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if set(cycle) != {"mask"}:
        (out_dir / "images").mkdir(exist_ok=True)
    if any(t in MASK_TASKS for t in cycle):
        (out_dir / "masks").mkdir(exist_ok=True)
    mark_folder(out_dir, "dataset")
    final = out_dir / "data.jsonl"
    partial = out_dir / "data.jsonl.partial"  # renamed at the end: a data.jsonl is always complete
    with partial.open("w", encoding="utf-8", newline="\n") as f:
        for i in range(n):
            scene, example = make_example(seed, i, image_size, cycle, encode_mask)
            line = {"image": f"images/{i:06d}.png"}
            if example["task"] in MASK_TASKS:
                mask = shape_mask(scene, scene.find(example["prefix"].split()[-1]))
                line["mask"] = f"masks/{i:06d}.png"
                Image.fromarray(mask.astype(np.uint8) * 255, "L").save(out_dir / line["mask"], format="PNG")
            if example["task"] == "mask":
                line = {"image": line["mask"]}  # the mask is the picture: nothing else to look at
            else:
                render(scene).save(out_dir / line["image"], format="PNG")
            f.write(json.dumps({**line, **example}, ensure_ascii=False) + "\n")
            if progress is not None:
                progress(i + 1, n)
    partial.replace(final)
    return final
