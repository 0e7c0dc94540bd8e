"""Segmentation answers to masks: parsing, big_vision's box math and resize, mask crops, COCO RLE."""

import numpy as np
import pytest
from PIL import Image

from paligemma_cli.processing.segmentation import (
    crop_mask,
    format_segmentation,
    mask_box,
    parse_segmentation,
    paste_mask,
    pixel_box,
    rle_decode,
    rle_encode,
)
from tests.fixtures.vae_oracle import decode_masks, paste_reference, pil_bilinear_weights, random_vae_params

SEGS = "".join(f"<seg{i * 8:03d}>" for i in range(16))
CODES = tuple(i * 8 for i in range(16))


def smooth_mask(seed=0):
    """A 64x64 decoder-like output: smooth, both signs, some exact zeros."""
    rs = np.random.RandomState(seed)
    y, x = np.mgrid[0:64, 0:64] / 63.0
    m = np.sin(6 * x + rs.rand()) * np.cos(5 * y + rs.rand()) + 0.3 * rs.randn(64, 64)
    m[:4, :4] = 0.0
    return m.astype(np.float32)


# --- parsing ---------------------------------------------------------------------------------------


def test_parses_objects_with_labels_and_without():
    text = f"<loc0100><loc0200><loc0500><loc0600>{SEGS} cat ; <loc0000><loc0000><loc1023><loc1023> {SEGS}"
    objects = parse_segmentation(text, 640, 480)
    assert [(o.label, o.bins, o.codes) for o in objects] == [
        ("cat", (100, 200, 500, 600), CODES), ("", (0, 0, 1023, 1023), CODES)]


@pytest.mark.parametrize("bad", [
    f"<loc0100><loc0200><loc0500>{SEGS} three locs",
    f"<loc0100><loc0200><loc0500><loc0600><loc0700>{SEGS} five locs",
    f"<loc0100><loc0200><loc0500><loc0600>{SEGS[:-8]} fifteen segs",
    f"<loc0100><loc0200><loc0500><loc0600>{SEGS}<seg001> seventeen segs",
    "<loc0100><loc0200><loc0500><loc0600> no segs",
    f"<loc0500><loc0200><loc0500><loc0600>{SEGS} ymax equals ymin",
    f"<loc0600><loc0200><loc0500><loc0600>{SEGS} ymax below ymin",
    f"<loc0100><loc0600><loc0500><loc0600>{SEGS} xmax equals xmin",
    f"<loc0100><loc0200><loc1024><loc0600>{SEGS} bin 1024",
    f"<loc0100><loc0200><loc0500><loc0600>{SEGS.replace('<seg000>', '<seg128>')} code 128",
    f"{SEGS}<loc0100><loc0200><loc0500><loc0600> segs first",
    "just words",
])
def test_malformed_objects_are_skipped(bad):
    good = f"<loc0001><loc0002><loc0900><loc0800>{SEGS} dog"
    objects = parse_segmentation(f"{bad} ; {good}", 100, 100)
    assert [o.label for o in objects] == ["dog"]


def test_a_box_that_truncates_to_nothing_is_skipped():
    # 1 bin apart: 100/1023*10 and 101/1023*10 both truncate to pixel 0 of a 10-pixel image.
    text = f"<loc0100><loc0100><loc0101><loc0101>{SEGS} speck"
    assert parse_segmentation(text, 10, 10) == []
    assert len(parse_segmentation(text, 500, 375)) == 1


def test_format_is_the_inverse():
    text = format_segmentation((0.1, 0.2, 0.5, 0.75), CODES, "circle")
    assert text == f"<loc0102><loc0205><loc0512><loc0767>{SEGS} circle"
    (obj,) = parse_segmentation(text, 64, 64)
    assert obj.codes == CODES and obj.label == "circle"
    assert format_segmentation((-0.1, 0, 1.2, 1), CODES).startswith("<loc0000><loc0000><loc1023><loc1023><seg")


# --- placement -----------------------------------------------------------------------------------------


def test_pixel_box_divides_by_1023_and_truncates():
    # The example where /1024 with rounding (the HF demo) gives an empty box and big_vision one pixel.
    assert pixel_box((100, 200, 101, 201), 500, 375) == (97, 36, 98, 37)
    assert pixel_box((0, 0, 1023, 1023), 640, 480) == (0, 0, 640, 480)


@pytest.mark.parametrize("size, bins", [
    ((480, 640), (512, 256, 768, 1000)),  # larger than 64 on both axes
    ((100, 100), (100, 200, 500, 400)),  # smaller than 64: Pillow's antialiased shrink
    ((375, 500), (100, 200, 101, 201)),  # a 1-pixel box
    ((480, 640), (0, 0, 1023, 1023)),  # the whole image
    ((48, 300), (0, 900, 1023, 1023)),  # at the right edge: short and wide, one axis each way
    ((300, 7), (10, 0, 1023, 1023)),  # at the bottom-left: 7 pixels wide
    ((64, 64), (300, 300, 300, 900)),  # ymax == ymin: empty
    ((64, 64), (500, 300, 300, 900)),  # ymax < ymin: empty
])
def test_paste_matches_the_reference(size, bins):
    height, width = size
    m64 = smooth_mask(sum(bins))
    got = paste_mask(m64, bins, width, height)
    expected = paste_reference(m64, bins, height, width)
    assert got.shape == (height, width) and got.dtype == bool
    np.testing.assert_array_equal(got, expected)
    x0, y0, x1, y1 = pixel_box(bins, width, height)
    outside = got.copy()
    outside[y0:y1, x0:x1] = False
    assert not outside.any()
    if bins[2] > bins[0] and x1 > x0:
        assert 0 < got.sum() < (x1 - x0) * (y1 - y0) or (x1 - x0) * (y1 - y0) <= 2


def test_threshold_is_strict():
    assert not paste_mask(np.zeros((64, 64), np.float32), (0, 0, 1023, 1023), 64, 64).any()
    assert paste_mask(np.full((64, 64), 1e-6, np.float32), (0, 0, 1023, 1023), 64, 64).all()


def test_pillow_resize_equals_the_weight_matrices():
    m = smooth_mask(3)
    for w, h in [(20, 7), (100, 33), (64, 64), (1, 1)]:
        resized = np.asarray(Image.fromarray(m, mode="F").resize((w, h), resample=Image.Resampling.BILINEAR))
        expected = pil_bilinear_weights(64, h) @ m.astype(np.float64) @ pil_bilinear_weights(64, w).T
        np.testing.assert_allclose(resized, expected, atol=1e-5)


GOLDEN_PASTES = [((480, 640), (512, 256, 768, 1000), 1, (240, 160, 360, 625), 33245),
                 ((100, 100), (100, 200, 500, 400), 1, (9, 19, 48, 39), 644),
                 ((480, 640), (0, 0, 1023, 1023), 0, (0, 0, 480, 640), 182376)]


@pytest.mark.parametrize("size, bins, row, box_yxyx, foreground", GOLDEN_PASTES)
def test_golden_pastes(size, bins, row, box_yxyx, foreground):
    idx = np.stack([np.arange(16), (np.arange(16) * 37 + 5) % 128])
    m64 = decode_masks(random_vae_params(0, 512), idx)[row, ..., 0].astype(np.float32)
    height, width = size
    x0, y0, x1, y1 = pixel_box(bins, width, height)
    assert (y0, x0, y1, x1) == box_yxyx
    assert paste_mask(m64, bins, width, height).sum() == foreground


# --- the training side -----------------------------------------------------------------------------------------


def test_crop_mask_stretches_the_box_to_64():
    mask = np.zeros((30, 50), bool)
    mask[5:25, 10:30] = True  # a 20x20 square
    crop = crop_mask(mask, (5 / 30, 10 / 50, 25 / 30, 30 / 50))
    assert crop.shape == (64, 64) and crop.dtype == np.float32
    assert crop.min() == 1.0
    wide = crop_mask(mask, (5 / 30, 0, 25 / 30, 30 / 50))  # the object fills the right two thirds
    assert wide[:, :20].max() == 0.0 and wide[:, 23:].min() == 1.0
    assert crop_mask(mask, (0.5, 0.5, 0.5, 0.9)) is None
    assert mask_box(mask) == (5 / 30, 10 / 50, 25 / 30, 30 / 50)
    assert mask_box(np.zeros((3, 3), bool)) is None


# --- COCO RLE ------------------------------------------------------------------------------------------------------


def rle_cases():
    rs = np.random.RandomState(0)
    cases = [np.zeros((5, 7), bool), np.ones((5, 7), bool), np.eye(6, dtype=bool), rs.rand(37, 23) > 0.5,
             rs.rand(1, 1) > 2, np.ones((1, 1), bool)]
    big = np.zeros((300, 400), bool)
    big[40:250, 10:390] = True  # long runs: counts over 31 need several characters, differences go negative
    big[100:120, 50:52] = False
    cases.append(big)
    return cases


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools on numpy 2
@pytest.mark.parametrize("mask", rle_cases(), ids=lambda m: f"{m.shape}-{int(m.sum())}")
def test_rle_equals_pycocotools(mask):
    coco = pytest.importorskip("pycocotools.mask")
    ours = rle_encode(mask)
    theirs = coco.encode(np.asfortranarray(mask.astype(np.uint8)))
    assert ours["size"] == list(theirs["size"])
    assert ours["counts"] == theirs["counts"].decode("ascii")
    np.testing.assert_array_equal(rle_decode(ours), mask)
    np.testing.assert_array_equal(coco.decode({"size": ours["size"], "counts": ours["counts"].encode()}), mask)
