"""`segment` prompts end to end: the model's tokens -> VQ-VAE masks -> masks in the original image.

References: big_vision `evaluators/proj/paligemma/transfers/segmentation.py` (decode the 16 codes to
64x64, place them in the box; see `processing.segmentation`), the PaliGemma README in big_vision
(`segment {things}` prompts, objects joined by ` ; `).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from paligemma_cli.checkpoints.vae import load_vae
from paligemma_cli.errors import PaliGemmaError
from paligemma_cli.model.vqvae import VQVAE
from paligemma_cli.processing.segmentation import SegmentedObject, crop_mask, parse_segmentation, paste_mask


@dataclass(frozen=True)
class Segment:
    """One segmented object in the original image.

    box: (x0, y0, x1, y1) in pixels, ends exclusive (where the mask was placed); mask: bool (H, W);
    bins and codes: the model's tokens, for scripts that want them.
    """

    label: str
    box: tuple[int, int, int, int]
    mask: np.ndarray
    bins: tuple[int, int, int, int]
    codes: tuple[int, ...]

    @property
    def area(self) -> int:
        return int(self.mask.sum())


def split_labels(objects: str | Sequence[str]) -> list[str]:
    """"circle ; square" (or a list) -> ["circle", "square"], blanks dropped."""
    parts = objects.split(";") if isinstance(objects, str) else list(objects)
    return [p.strip() for p in parts if p.strip()]


def segment_prompt(labels: Sequence[str]) -> str:
    """PaliGemma's prompt for `labels`: `segment circle ; square`."""
    if not labels:
        raise PaliGemmaError("say what to segment, e.g. \"cat\" or \"cat ; dog\"")
    return "segment " + " ; ".join(labels)


class MaskCodec:
    """A loaded VQ-VAE: 16 codes <-> 64x64 masks, and answers -> `Segment`s."""

    def __init__(self, vae: VQVAE, path: Path | None = None, has_encoder: bool = True):
        self.vae = vae.eval()
        self.path = path
        self.has_encoder = has_encoder

    @classmethod
    def load(cls, path: str | Path) -> "MaskCodec":
        vae, has_encoder = load_vae(path)
        return cls(vae, Path(path), has_encoder)

    def decode(self, codes: Sequence[Sequence[int]]) -> np.ndarray:
        """N code lists -> float32 (N, 64, 64) decoder outputs (foreground where > 0)."""
        if not len(codes):
            return np.zeros((0, 64, 64), np.float32)
        return self.vae.decode_codes(torch.tensor([list(c) for c in codes])).numpy()

    def decode_one(self, codes: Sequence[int]) -> np.ndarray:
        """One code list -> float32 (64, 64)."""
        return self.decode([codes])[0]

    def encode(self, masks64: np.ndarray) -> np.ndarray:
        """float (N, 64, 64) box crops in [0, 1] (see `processing.segmentation.crop_mask`) -> int (N, 16)."""
        if not self.has_encoder:
            raise PaliGemmaError(f"'{self.path}' holds only the VQ-VAE's decoder; encoding masks needs the encoder "
                                 "arrays (encoder.*) too")
        return self.vae.codes(torch.from_numpy(np.array(masks64, np.float32))[:, None]).numpy()  # a writable copy

    def encode_mask(self, mask: np.ndarray, box: Sequence[float]) -> list[int] | None:
        """The 16 codes of a whole-image mask's `box` (y0, x0, y1, x1 normalised); None for an empty box."""
        crop = crop_mask(mask, box)
        return None if crop is None else self.encode(crop[None])[0].tolist()

    def segments(self, answer: str, width: int, height: int, labels: Sequence[str] = ()) -> list[Segment]:
        """The well-formed objects of `answer`, their masks in a `width` x `height` image.

        An object without a label (as a RefCOCO-style transfer answers) takes the prompt's label when
        the prompt named exactly one.
        """
        objects: list[SegmentedObject] = parse_segmentation(answer, width, height)
        masks64 = self.decode([o.codes for o in objects])
        fallback = labels[0] if len(labels) == 1 else ""
        return [Segment(o.label or fallback, o.pixel_box(width, height), paste_mask(m, o.bins, width, height),
                        o.bins, o.codes) for o, m in zip(objects, masks64)]


def segment_images(pipeline, codec: MaskCodec, images: Sequence, labels: Sequence[str], opts) -> list[tuple[str, list[Segment]]]:
    """Ask `segment labels` about each PIL image; returns (raw answer, segments) per image."""
    prompt = segment_prompt(labels)
    answers = pipeline.generate(list(images), [prompt] * len(images), opts)
    return [(a, codec.segments(a, im.width, im.height, labels)) for a, im in zip(answers, images)]
