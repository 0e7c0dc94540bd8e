"""The shapes world: determinism, and answers that agree with the rendered pixels."""

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from paligemma_cli.data import shapes
from paligemma_cli.data.shapes import (
    BACKGROUND,
    COLORS,
    SHAPES,
    make_example,
    make_scene,
    render,
    reordered_captions,
    scene_examples,
    write_dataset,
)
from paligemma_cli.processing.locations import Box, format_detections, parse_detections
from paligemma_cli.processing.segmentation import mask_box, parse_segmentation

EXAMPLE_IMAGE = Path(__file__).parents[2] / "examples" / "shapes.png"
EXAMPLE_SEED, EXAMPLE_INDEX = 9, 0  # the scene behind examples/shapes.png


# ---------------------------------------------------------------------------------------------
# Reading a rendered image back without trusting the scene description


def blobs(image: Image.Image) -> dict[str, tuple[int, int, int, int]]:
    """{colour name: pixel box (x0, y0, x1, y1)} for every colour present, checking each is one blob."""
    pixels = np.asarray(image)
    found = {}
    for name, rgb in COLORS.items():
        mask = (pixels == rgb).all(axis=-1)
        if not mask.any():
            continue
        assert _components(mask) == 1, f"{name} is not a single connected blob"
        ys, xs = np.nonzero(mask)
        found[name] = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    known = {BACKGROUND, *COLORS.values()}
    assert {tuple(p) for p in pixels.reshape(-1, 3)} <= known, "a pixel is neither background nor a colour"
    return found


def _components(mask: np.ndarray) -> int:
    seen = np.zeros_like(mask)
    count = 0
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        count += 1
        stack = [start]
        seen[start] = True
        while stack:
            y, x = stack.pop()
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
    return count


def center_x(box):
    return (box[0] + box[2]) / 2


# ---------------------------------------------------------------------------------------------
# Answers against pixels


@pytest.mark.parametrize("size", [64, 96])
def test_every_answer_agrees_with_the_pixels(size):
    for index in range(150):
        scene = make_scene(seed=3, index=index, size=size)
        image = render(scene)
        assert image.size == (size, size) and image.mode == "RGB"
        found = blobs(image)  # colour -> box, measured from pixels only
        for ex in scene_examples(scene):
            prefix, suffix = ex["prefix"], ex["suffix"]
            if ex["task"] == "count":
                assert suffix == str(len(found))
            elif ex["task"] == "caption":
                parts = re.split(r", | and ", suffix)
                named = [re.fullmatch(r"(an?) (\w+) (\w+)", p).groups() for p in parts]
                assert all(article == ("an" if c[0] in "aeiou" else "a") for article, c, _ in named), suffix
                assert [c for _, c, _ in named] == sorted(found, key=lambda c: center_x(found[c])), suffix
                assert [k for _, _, k in named] == [_kind_of(image, found[c]) for _, c, _ in named], suffix
            elif ex["task"] == "color":
                kind = re.fullmatch(r"answer en what color is the (\w+)\?", prefix).group(1)
                assert suffix in found
                assert _kind_of(image, found[suffix]) == kind
            elif ex["task"] == "spatial":
                a, b = re.fullmatch(r"answer en is the (\w+) left of the (\w+)\?", prefix).groups()
                box = {_kind_of(image, bx): bx for bx in found.values()}
                left, right = (a, b) if suffix == "yes" else (b, a)
                assert suffix in ("yes", "no")
                assert center_x(box[left]) < box[right][0] and center_x(box[right]) > box[left][2]
            elif ex["task"] == "detect":
                kind = prefix.removeprefix("detect ")
                [box] = parse_detections(suffix, size, size)
                assert box.label == kind
                x0, y0, x1, y1 = (round(v) for v in (box.x0, box.y0, box.x1, box.y1))
                centre = image.getpixel(((x0 + x1) // 2, (y0 + y1) // 2))
                colour = next(c for c, rgb in COLORS.items() if rgb == centre)
                assert found[colour] == (x0, y0, x1, y1), "the detect box is not the blob's tight box"
                assert _kind_of(image, found[colour]) == kind
            else:
                raise AssertionError(ex)


def _kind_of(image: Image.Image, box) -> str:
    """Tell the shape in `box` from how much of its box it fills: square 1, circle pi/4, triangle 1/2."""
    region = np.asarray(image.crop(box))
    fill = (region != BACKGROUND).any(axis=-1).mean()
    return "square" if fill > 0.95 else "circle" if fill > 0.65 else "triangle"


def test_scene_rules_hold():
    counts = Counter()
    for index in range(300):
        scene = make_scene(seed=5, index=index)
        kinds = [s.kind for s in scene.shapes]
        colours = [s.color for s in scene.shapes]
        assert len(set(kinds)) == len(kinds) and len(set(colours)) == len(colours)
        assert set(kinds) <= set(SHAPES)
        assert [s.center_x for s in scene.shapes] == sorted(s.center_x for s in scene.shapes)
        for a, b in zip(scene.shapes, scene.shapes[1:]):
            # left to right without doubt: each centre outside the other's horizontal extent
            assert a.center_x < b.box[0] and b.center_x > a.box[2]
        counts[len(scene.shapes)] += 1
    assert set(counts) == {1, 2, 3}


def test_each_shape_fills_its_square_exactly():
    # render() and the detect answers rely on this: the nominal square is the tight pixel box.
    for kind in SHAPES:
        for side in range(4, 256):
            mask = Image.new("L", (258, 258), 0)
            shapes._draw(ImageDraw.Draw(mask), kind, 1, 1, side, 255)
            assert mask.getbbox() == (1, 1, 1 + side, 1 + side), (kind, side)


# ---------------------------------------------------------------------------------------------
# Loc tokens


@pytest.mark.parametrize("size", [64, 224])
def test_loc_tokens_round_trip(size):
    for v in range(1, size):  # every pixel box of the world's sizes survives the 1024 bins
        box = (v, size - v, min(v + 5, size), size)
        text = format_detections([Box("circle", *box)], size, size)
        assert re.fullmatch(r"(<loc\d{4}>){4} circle", text)
        [decoded] = parse_detections(text, size, size)
        assert tuple(round(c) for c in (decoded.x0, decoded.y0, decoded.x1, decoded.y1)) == box
        assert decoded.label == "circle"


def test_loc_tokens_are_y_first_and_span_0_to_1023():
    assert format_detections([Box("a", 0, 32, 64, 64)], 64, 64) == "<loc0512><loc0000><loc1023><loc1023> a"
    text = "<loc0000><loc0512><loc1023><loc1023> a ; <loc0001><loc0002><loc0003><loc0004> b"
    assert [(b.x0, b.y0, b.x1, b.y1, b.label) for b in parse_detections(text, 1023, 1023)] == [
        (512.0, 0.0, 1023.0, 1023.0, "a"),
        (2.0, 1.0, 4.0, 3.0, "b"),
    ]


# ---------------------------------------------------------------------------------------------
# Datasets


def test_same_seed_same_bytes_and_different_seeds_differ(tmp_path):
    a = write_dataset(tmp_path / "a", 25, seed=7)
    b = write_dataset(tmp_path / "b", 25, seed=7)
    c = write_dataset(tmp_path / "c", 25, seed=8)
    assert a == tmp_path / "a" / "data.jsonl"
    assert a.read_bytes() == b.read_bytes()
    for i in range(25):
        assert (a.parent / f"images/{i:06d}.png").read_bytes() == (b.parent / f"images/{i:06d}.png").read_bytes()
    assert a.read_bytes() != c.read_bytes()
    assert not (a.parent / "data.jsonl.partial").exists()


def test_a_small_dataset_is_a_prefix_of_a_bigger_one(tmp_path):
    small = write_dataset(tmp_path / "small", 10, seed=0).read_text().splitlines()
    big = write_dataset(tmp_path / "big", 30, seed=0).read_text().splitlines()
    assert big[:10] == small


def test_task_mix_is_exact_and_progress_is_reported(tmp_path):
    calls = []
    path = write_dataset(tmp_path, 40, seed=1, image_size=32, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i, 40) for i in range(1, 41)]
    lines = path.read_text().splitlines()
    assert Counter(re.search(r'"task": "(\w+)"', line).group(1) for line in lines) == {
        "detect": 12, "caption": 8, "color": 8, "spatial": 8, "count": 4,
    }
    assert Image.open(tmp_path / "images" / "000039.png").size == (32, 32)


def test_spatial_examples_have_two_shapes_and_balanced_answers():
    answers = Counter()
    for i in range(400):
        scene, ex = make_example(seed=2, index=i)
        if ex["task"] == "spatial":
            assert len(scene.shapes) >= 2
            answers[ex["suffix"]] += 1
    assert set(answers) == {"yes", "no"} and min(answers.values()) > 0.35 * sum(answers.values())


# ---------------------------------------------------------------------------------------------
# The README's example image


def test_example_image_regenerates_identically():
    scene = make_scene(EXAMPLE_SEED, EXAMPLE_INDEX)
    assert np.array_equal(np.asarray(Image.open(EXAMPLE_IMAGE).convert("RGB")), np.asarray(render(scene)))
    # The README asks "what color is the circle?" about this file.
    assert scene.find("circle").color == "orange"


def test_detect_targets_are_the_shapes_boxes_through_the_models_format():
    # The training target of `detect <shape>` is what `parse_detections` reads back as the shape's box.
    for index in range(50):
        scene = make_scene(seed=6, index=index)
        for ex in scene_examples(scene):
            if ex["task"] == "detect":
                kind = ex["prefix"].removeprefix("detect ")
                [box] = parse_detections(ex["suffix"], scene.size, scene.size)
                expected = scene.find(kind).box
                assert box.label == kind
                assert tuple(round(c) for c in (box.x0, box.y0, box.x1, box.y1)) == expected
                assert format_detections([box], scene.size, scene.size) == ex["suffix"]


def test_caption_negatives_are_the_same_shapes_in_every_other_order():
    seen = Counter()
    for i in range(60):
        scene = make_scene(3, i)
        own = shapes.caption(scene)
        negatives = reordered_captions(scene)
        n = len(scene.shapes)
        assert len(negatives) == {1: 0, 2: 1, 3: 5}[n]  # n! - 1 orders: colours and kinds never repeat
        for neg in negatives:
            assert neg != own and sorted(re.split(r", | and ", neg)) == sorted(re.split(r", | and ", own))
        line = scene_examples(scene)[0]
        assert line["task"] == "caption" and line.get("negatives", []) == negatives
        seen[n] += 1
    assert set(seen) == {1, 2, 3}


# ---------------------------------------------------------------------------------------------
# Segmentation: masks and <seg> targets, only when asked for


def test_shape_masks_are_the_shapes_pixels():
    for index in range(30):
        scene = make_scene(seed=4, index=index)
        pixels = np.asarray(render(scene))
        for s in scene.shapes:
            mask = shapes.shape_mask(scene, s)
            np.testing.assert_array_equal(mask, (pixels == COLORS[s.color]).all(-1))
            assert mask_box(mask) == tuple(v / scene.size for v in (s.box[1], s.box[0], s.box[3], s.box[2]))


def fake_encoder(calls):
    def encode(mask, box):
        calls.append((mask, box))
        return list(range(int(mask.sum()) % 100, int(mask.sum()) % 100 + 16))
    return encode


def test_segment_examples_carry_the_box_the_codes_and_the_mask(tmp_path):
    calls = []
    path = write_dataset(tmp_path, 12, seed=5, tasks=["segment"], encode_mask=fake_encoder(calls))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(calls) == 12 and {line["task"] for line in lines} == {"segment"}
    for i, line in enumerate(lines):
        scene, _ = make_example(5, i, cycle=("segment",), encode_mask=fake_encoder([]))
        kind = line["prefix"].removeprefix("segment ")
        shape = scene.find(kind)
        mask = np.asarray(Image.open(tmp_path / line["mask"])) > 0
        np.testing.assert_array_equal(mask, shapes.shape_mask(scene, shape))
        [obj] = parse_segmentation(line["suffix"], scene.size, scene.size)
        assert obj.label == kind and list(obj.codes) == fake_encoder([])(mask, None)
        # big_vision's placement (int(bin / 1023 * size)) gives back the shape's exact box.
        assert obj.pixel_box(scene.size, scene.size) == shape.box
        np.testing.assert_array_equal(calls[i][0], mask)
        x0, y0, x1, y1 = shape.box
        assert calls[i][1] == (y0 / 64, x0 / 64, y1 / 64, x1 / 64)  # the crop is the box itself
        assert Image.open(tmp_path / line["image"]).size == (64, 64)


def test_mask_examples_are_mask_images_and_the_default_mix_has_neither(tmp_path):
    path = write_dataset(tmp_path / "m", 6, seed=5, tasks=["mask"])
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert all(line["image"].startswith("masks/") and line["task"] == "mask" for line in lines)
    assert not (tmp_path / "m" / "images").exists()
    assert set(np.unique(np.asarray(Image.open(tmp_path / "m" / lines[0]["image"])))) == {0, 255}
    assert "segment" not in shapes.task_cycle(None) and "mask" not in shapes.task_cycle(None)
    mixed = shapes.task_cycle(["detect", "segment"])
    assert Counter(mixed) == {"detect": 3, "segment": 3}
    every = shapes.task_cycle(["all"])
    assert every[::2] == shapes.TASK_CYCLE and set(every[1::2]) == {"segment"}
    with pytest.raises(ValueError, match="give it alone"):
        shapes.task_cycle(["all", "detect"])
    with pytest.raises(ValueError, match="mask encoder"):
        write_dataset(tmp_path / "s", 3, seed=5, tasks=["segment"])
    with pytest.raises(ValueError, match="unknown task"):
        shapes.task_cycle(["segmentation"])
