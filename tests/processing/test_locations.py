"""Detection answers: parsing, formatting, drawing, IoU, and precision/recall scoring."""

import random

import pytest
from PIL import Image

from paligemma_cli.evaluation.boxes import box_iou, detection_scores, match_boxes
from paligemma_cli.processing.drawing import draw_boxes
from paligemma_cli.processing.locations import Box, format_detections, parse_detections


def test_parse_decodes_bins_against_1023():
    text = "<loc0000><loc0000><loc1023><loc0511> cat ; <loc0100><loc0200><loc0300><loc0400> big dog"
    boxes = parse_detections(text, 640, 480)
    assert [b.label for b in boxes] == ["cat", "big dog"]
    cat, dog = boxes
    # Token order is y0 x0 y1 x1; bin 1023 is the far edge, not 1024.
    assert (cat.x0, cat.y0, cat.x1, cat.y1) == (0.0, 0.0, pytest.approx(511 / 1023 * 640), 480.0)
    assert cat.bins == (0, 0, 1023, 511)
    assert dog.y0 == pytest.approx(100 / 1023 * 480)
    assert dog.x0 == pytest.approx(200 / 1023 * 640)
    assert dog.y1 == pytest.approx(300 / 1023 * 480)
    assert dog.x1 == pytest.approx(400 / 1023 * 640)


def test_parse_ignores_segmentation_codes():
    seg = "".join(f"<seg{i:03d}>" for i in range(16))
    boxes = parse_detections(f"<loc0100><loc0200><loc0300><loc0400>{seg} cat", 100, 100)
    assert len(boxes) == 1 and boxes[0].label == "cat" and boxes[0].bins == (100, 200, 300, 400)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "no boxes here",
        "<loc0100><loc0200><loc0300> cat",  # three locs
        "<loc0100><loc0200><loc0300><loc0400><loc0500> cat",  # five locs
        "<loc0300><loc0200><loc0100><loc0400> cat",  # y1 < y0
        "<loc0100><loc0400><loc0300><loc0400> cat",  # x1 == x0
        "<loc0100><loc0200><loc0300><loc0400>",  # no label
        "<loc0100><loc0200><loc0300><loc0400>   ",  # blank label
        "<loc0100><loc0200><loc0300><loc1024> cat",  # bin out of range
        "cat <loc0100><loc0200><loc0300><loc0400>",  # label first
        "<loc0100><loc0200><loc0300><loc0400> cat <loc0100>",  # locs inside the label
        ";;; ; ",
    ],
)
def test_malformed_objects_are_skipped(text):
    assert parse_detections(text, 224, 224) == []


def test_one_bad_object_does_not_lose_the_others():
    text = (
        "<loc0100><loc0200> cat"
        " ; <loc0100><loc0200><loc0300><loc0400> dog"
        " ; <loc0500><loc0200><loc0300><loc0400> bird"
    )
    assert [b.label for b in parse_detections(text, 224, 224)] == ["dog"]


def test_format_then_parse_round_trips_within_one_bin():
    rng = random.Random(0)
    width, height = 640, 427
    boxes = []
    for i in range(50):
        x0, x1 = sorted(rng.uniform(0, width) for _ in range(2))
        y0, y1 = sorted(rng.uniform(0, height) for _ in range(2))
        if x1 - x0 < 5 or y1 - y0 < 5:  # too thin to survive binning as a box; skip
            continue
        boxes.append(Box(f"thing {i}", x0, y0, x1, y1))
    text = format_detections(boxes, width, height)
    parsed = parse_detections(text, width, height)
    assert len(parsed) == len(boxes)
    for want, got in zip(boxes, parsed):
        assert got.label == want.label
        for a, b, size in ((want.x0, got.x0, width), (want.y0, got.y0, height),
                           (want.x1, got.x1, width), (want.y1, got.y1, height)):
            assert abs(a - b) <= size / 1023


def test_format_matches_the_token_layout():
    cat = Box("cat", x0=0, y0=0, x1=100, y1=50)  # y1: 50/100 * 1023 = 511.5 -> 512 (half to even)
    dog = Box("dog", x0=-5, y0=10, x1=120, y1=20)  # sticks out on both sides: clamped to 0 and 1023
    assert format_detections([cat, dog], 100, 100) == (
        "<loc0000><loc0000><loc0512><loc1023> cat ; <loc0102><loc0000><loc0205><loc1023> dog"
    )


def test_box_iou_by_hand():
    a = Box("x", 0, 0, 10, 10)
    b = Box("x", 5, 0, 15, 10)  # overlap 5x10 = 50, union 100 + 100 - 50 = 150
    assert box_iou(a, b) == pytest.approx(1 / 3)
    assert box_iou(a, a) == 1.0
    assert box_iou(a, Box("x", 20, 20, 30, 30)) == 0.0
    assert box_iou(Box("x", 0, 0, 0, 0), Box("x", 0, 0, 0, 0)) == 0.0


def test_draw_boxes_draws_on_a_copy():
    image = Image.new("RGB", (64, 48), "black")
    out = draw_boxes(image, [Box("cat", 10, 20, 50, 40), Box("dog", 0, 0, 20, 20)])
    assert out.size == image.size and out is not image
    assert image.getpixel((10, 30)) == (0, 0, 0)  # the original is untouched
    assert out.getpixel((10, 30)) != (0, 0, 0)  # left edge of the cat box
    assert out.getpixel((30, 30)) == (0, 0, 0)  # inside stays clear
    assert draw_boxes(image.convert("L"), []).mode == "RGB"


def test_detection_scores_by_hand():
    gt = [[Box("cat", 0, 0, 10, 10), Box("dog", 20, 20, 30, 30)], [Box("cat", 0, 0, 10, 10)]]
    pred = [
        [
            Box("cat", 5, 0, 15, 10),  # IoU 1/3 with the cat: below 0.5, not a match
            Box("Dog ", 20, 20, 30, 30),  # IoU 1, label differs only in case/space: match
            Box("cat", 20, 20, 30, 30),  # right place, wrong label: not a match
        ],
        [
            Box("cat", 0, 0, 10, 8),  # IoU 0.8: match
            Box("cat", 0, 0, 10, 10),  # IoU 1: takes the cat first (greedy by IoU)
        ],
    ]
    s = detection_scores(pred, gt, iou=0.5)
    assert (s.num_predicted, s.num_ground_truth, s.num_matched) == (5, 3, 2)
    assert s.precision == pytest.approx(2 / 5)
    assert s.recall == pytest.approx(2 / 3)
    assert s.mean_iou == pytest.approx(1.0)
    assert match_boxes(pred[1], gt[1]) == [(1, 0, 1.0)]
    # At a threshold of 0.3 the first cat counts too.
    assert detection_scores(pred, gt, iou=0.3).num_matched == 3


def test_detection_scores_empty_cases():
    assert detection_scores([[]], [[]]).precision == 1.0
    s = detection_scores([[]], [[Box("cat", 0, 0, 1, 1)]])
    assert (s.precision, s.recall, s.mean_iou) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError):
        detection_scores([[]], [])
