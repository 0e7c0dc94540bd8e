"""Segmentation answers: `<loc>` x 4 + `<seg>` x 16 (+ label) per object, to boxes and masks, and back.

References: big_vision `evaluators/proj/paligemma/transfers/segmentation.py` (`Evaluator.run`: how a
decoded 64x64 mask is placed in the original image, the validity rules), `pp/proj/paligemma/
segmentation.py` (`refcoco_mask2str`: how a mask becomes the 64x64 training input), the parser of the
`big-vision/paligemma` Hugging Face demo (labels after the tokens, objects joined by ` ; `), and
pycocotools `maskApi.c` (`rleEncode`, `rleToString`: COCO's compressed RLE).

Placement, as big_vision measures it: the box is bins / 1023 (not 1024) of the original height and
width, truncated with int() and end-exclusive; the 64x64 decoder output is resized to the box with
Pillow's BILINEAR on float32 values (which shrinks with a widened triangle filter, i.e. antialiased)
and thresholded at > 0, so an exact 0 is background. The model's input resolution never enters: the
image was squeezed to a square without keeping its aspect ratio, so bins map linearly onto it.

NumPy and Pillow only: the VQ-VAE that turns codes into 64x64 masks lives in `model.vqvae`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

MAX_BIN = 1023
NUM_SEG_TOKENS, NUM_CODES = 16, 128
MASK_SIZE = 64

_OBJECT = re.compile(r"^((?:<loc\d+>)+)\s*((?:<seg\d+>)*)\s*(.*?)\s*$", re.DOTALL)
_LOC = re.compile(r"<loc(\d+)>")
_SEG = re.compile(r"<seg(\d+)>")


@dataclass(frozen=True)
class SegmentedObject:
    """One object of a segmentation answer, before its mask is decoded.

    bins: (y0, x0, y1, x1) location bins 0..1023, in token order; codes: the 16 `<segNNN>` numbers
    (0..127), row-major over the VQ-VAE's 4x4 grid; label: the text after the tokens ("" if none).
    """

    label: str
    bins: tuple[int, int, int, int]
    codes: tuple[int, ...]

    def pixel_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) in the original image's pixels, ends exclusive (see `pixel_box`)."""
        return pixel_box(self.bins, width, height)


def pixel_box(bins: Sequence[int], width: int, height: int) -> tuple[int, int, int, int]:
    """big_vision's placement box: (x0, y0, x1, y1) = int(bin / 1023 * size), ends exclusive."""
    y0, x0, y1, x1 = (b / MAX_BIN for b in bins)
    return int(x0 * width), int(y0 * height), int(x1 * width), int(y1 * height)


def parse_object(piece: str) -> SegmentedObject | None:
    """One object's text (`<loc>` x 4, `<seg>` x 16, optional label), or None unless its tokens are valid as
    big_vision's evaluator checks them: bins 0..1023, codes 0..127, y1 > y0 and x1 > x0."""
    match = _OBJECT.match(piece.strip())
    if match is None:
        return None
    bins = tuple(int(b) for b in _LOC.findall(match.group(1)))
    codes = tuple(int(c) for c in _SEG.findall(match.group(2)))
    label = match.group(3)
    if len(bins) != 4 or len(codes) != NUM_SEG_TOKENS or "<loc" in label or "<seg" in label:
        return None
    if max(bins) > MAX_BIN or max(codes) >= NUM_CODES or bins[2] <= bins[0] or bins[3] <= bins[1]:
        return None
    return SegmentedObject(label, bins, codes)


def parse_segmentation(text: str, width: int, height: int) -> list[SegmentedObject]:
    """The well-formed objects of a segmentation answer, in order.

    An object is 4 loc tokens, 16 seg tokens and an optional label; objects are separated by `;`.
    A piece with another count of either token, a bin above 1023, a code above 127, y1 <= y0 or
    x1 <= x0, or a box that truncates to no pixel in a `width` x `height` image is skipped (as
    `detect` skips malformed boxes): a model's output is not trusted to be well formed, and one bad
    object should not lose the others.
    """
    objects = []
    for piece in text.split(";"):
        obj = parse_object(piece)
        if obj is None:
            continue
        x0, y0, x1, y1 = obj.pixel_box(width, height)
        if x1 > x0 and y1 > y0:
            objects.append(obj)
    return objects


def _to_bin(value: float) -> int:
    return min(MAX_BIN, max(0, round(value * MAX_BIN)))


def format_segmentation(box: Sequence[float], codes: Sequence[int], label: str = "") -> str:
    """The answer for one object: box (y0, x0, y1, x1) normalised to [0, 1], 16 codes, then the label
    (big_vision bins `round(v * 1023)` clipped to 0..1023)."""
    locs = "".join(f"<loc{_to_bin(v):04d}>" for v in box)
    segs = "".join(f"<seg{int(c):03d}>" for c in codes)
    return f"{locs}{segs} {label}" if label else locs + segs


def paste_mask(mask64: np.ndarray, bins: Sequence[int], width: int, height: int) -> np.ndarray:
    """The decoder's 64x64 output placed in a `height` x `width` boolean mask (empty for an invalid box)."""
    full = np.zeros((height, width), dtype=bool)
    x0, y0, x1, y1 = pixel_box(bins, width, height)
    if bins[2] <= bins[0] or bins[3] <= bins[1] or x1 <= x0 or y1 <= y0:
        return full
    resized = Image.fromarray(np.ascontiguousarray(mask64, dtype=np.float32), mode="F").resize(
        (x1 - x0, y1 - y0), resample=Image.Resampling.BILINEAR)
    full[y0:y1, x0:x1] = np.asarray(resized) > 0.0
    return full


def crop_mask(mask: np.ndarray, box: Sequence[float]) -> np.ndarray | None:
    """An object's mask as the VQ-VAE encoder takes it: the box's content stretched to 64x64, in [0, 1].

    Args:
        mask: (H, W) of the whole image, boolean or 0..1.
        box: (y0, x0, y1, x1) normalised to [0, 1]; rows round(H * y0):round(H * y1) and columns
            likewise are cropped, as big_vision's `refcoco_mask2str` does.

    Returns:
        float32 (64, 64), bilinear with antialiasing (Pillow's BILINEAR), or None when the box holds
        no pixel.
    """
    h, w = mask.shape
    y0, x0, y1, x1 = (round(h * box[0]), round(w * box[1]), round(h * box[2]), round(w * box[3]))
    crop = np.asarray(mask, dtype=np.float32)[y0:y1, x0:x1]
    if crop.size == 0:
        return None
    return np.asarray(Image.fromarray(np.ascontiguousarray(crop), mode="F").resize(
        (MASK_SIZE, MASK_SIZE), resample=Image.Resampling.BILINEAR), dtype=np.float32)


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """The tight box of a mask's foreground, (y0, x0, y1, x1) normalised, ends exclusive; None if empty."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return None
    h, w = mask.shape
    return rows[0] / h, cols[0] / w, (rows[-1] + 1) / h, (cols[-1] + 1) / w


# --- COCO run-length encoding -------------------------------------------------------------------------------


def rle_encode(mask: np.ndarray) -> dict:
    """A boolean (H, W) mask as COCO's compressed RLE, `{"size": [H, W], "counts": "..."}`: what
    `pycocotools.mask.encode` writes (with `counts` as text, as COCO's JSON files hold it).

    Runs are counted down the columns (Fortran order), starting with background; each count but the
    first two is stored as the difference to the count two before, in 5-bit groups, low first, each
    group + 48 as one character, 0x20 flagging that another group follows.
    """
    h, w = mask.shape
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    edges = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(edges).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    if not flat.size:
        counts = []
    chars = []
    for i, count in enumerate(counts):
        x = count - counts[i - 2] if i > 2 else count
        more = True
        while more:
            c = x & 0x1F
            x >>= 5  # arithmetic shift: a negative difference ends in -1
            more = x != -1 if c & 0x10 else x != 0
            chars.append(chr(c + (0x20 if more else 0) + 48))
    return {"size": [h, w], "counts": "".join(chars)}


def rle_decode(rle: dict) -> np.ndarray:
    """The inverse of `rle_encode`: a boolean (H, W) mask."""
    h, w = rle["size"]
    counts, pos, text = [], 0, rle["counts"]
    while pos < len(text):
        x, k, more = 0, 0, True
        while more:
            c = ord(text[pos]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            pos += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    flat = np.zeros(h * w, dtype=bool)
    start = 0
    for i, count in enumerate(counts):
        if i % 2:  # odd runs are foreground
            flat[start:start + count] = True
        start += count
    return flat.reshape((w, h)).T
