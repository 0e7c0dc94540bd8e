"""Prompts and images to model inputs, as transformers' `PaliGemmaProcessor` builds them.

References: transformers' `PaliGemmaProcessor` (whose outputs the tests compare against); big_vision's
PaliGemma README for the prompt layout.

One example is laid out as

    <image> x n | <bos> | prefix "\\n" | suffix <eos>
    type 0 ........................... | type 1          (token_type_ids: prefix-LM blocks)
    label -100 ....................... | suffix ids      (loss only on what the model must say)

With several images in one prompt (PaliGemma's multi-image transfers, e.g. NLVR2: the PaliGemma paper,
section on multi-image tasks; transformers' processor with a list of images per prompt), each image's
n tokens come in order before the `<bos>`, and `pixel_values` holds every prompt's images in turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from paligemma_cli.errors import PaliGemmaError
from paligemma_cli.processing.image import load_image, preprocess
from paligemma_cli.processing.tokenizer import PaliGemmaTokenizer

IGNORE_INDEX = -100  # cross-entropy skips these labels


class PaliGemmaProcessor:
    """Builds batches of `input_ids`, `attention_mask`, `token_type_ids`, `pixel_values`, `labels`.

    Args:
        tokenizer: the checkpoint's tokenizer.
        image_size: S, the side of the square model input (vision_config.image_size).
        num_image_tokens: n, `<image>` tokens per image, (S / patch)**2 (256 at 224 px).
    """

    def __init__(self, tokenizer: PaliGemmaTokenizer, image_size: int, num_image_tokens: int):
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.num_image_tokens = num_image_tokens

    def prompt_ids(self, prefix: str, num_images: int = 1) -> list[int]:
        """`[<image>] * n * num_images + [<bos>] + encode(prefix + "\\n")`: the part the model reads (type 0).

        The prefix and its "\\n" are tokenized together, as transformers tokenizes the whole prompt
        string: "\\n" is its own piece, so this equals encode(prefix) + [newline_id] for Gemma. Several
        images put their blocks one after the other, as transformers' processor does.
        """
        tok = self.tokenizer
        return [tok.image_token_id] * (self.num_image_tokens * num_images) + [tok.bos_id] + tok.encode(prefix + "\n")

    def suffix_ids(self, suffix: str) -> list[int]:
        """`encode(suffix) + [<eos>]`: the part the model learns to say (type 1)."""
        return self.tokenizer.encode(suffix) + [self.tokenizer.eos_id]

    def __call__(
        self,
        prompts: str | Sequence[str],
        images=None,
        suffixes: str | Sequence[str] | None = None,
        padding_side: str | None = None,
        max_length: int | None = None,
    ) -> dict:
        """Tokenize a batch and preprocess its images.

        Args:
            prompts: B prefixes ("caption en", "detect cat ; dog"), or one string.
            images: one entry per prompt, each an image (PIL image, path or encoded bytes) or a list
                of images that prompt is about, in order; or None to leave out `pixel_values`.
            suffixes: B target answers for training, or None for generation.
            padding_side: "left" (generation: every row ends at the last column, so new tokens
                append in one place) or "right" (training). Default: left without suffixes,
                right with them. transformers' processor pads left in both cases (Gemma's default).
            max_length: the longest row the model allows, or None for no limit.

        Returns:
            dict of tensors, T the longest row:
            input_ids, attention_mask, token_type_ids: int64 [B, T];
            labels: int64 [B, T], only with suffixes (-100 outside suffix + eos);
            pixel_values: float32 [I, 3, S, S], only with images: I = B with one image per prompt,
                else every prompt's images in turn.

        Raises:
            PaliGemmaError: when a row is longer than `max_length`, or counts do not match.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise PaliGemmaError("no prompts given: pass at least one prompt")
        if isinstance(suffixes, str):
            suffixes = [suffixes]
        if suffixes is not None and len(suffixes) != len(prompts):
            raise PaliGemmaError(f"got {len(prompts)} prompts but {len(suffixes)} suffixes: give one suffix per prompt")
        if padding_side is None:
            padding_side = "left" if suffixes is None else "right"
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")

        per_prompt = None if images is None else self._images_per_prompt(images, len(prompts))
        rows = []  # (ids, types, labels) per example
        for i, prefix in enumerate(prompts):
            ids = self.prompt_ids(prefix, 1 if per_prompt is None else len(per_prompt[i]))
            self._check_length(len(ids), max_length, "prompt")
            types = [0] * len(ids)
            labels = [IGNORE_INDEX] * len(ids)
            if suffixes is not None:
                answer = self.suffix_ids(suffixes[i])
                self._check_length(len(ids) + len(answer), max_length, "prompt with its suffix")
                ids, types, labels = ids + answer, types + [1] * len(answer), labels + answer
            rows.append((ids, types, labels))

        T = max(len(ids) for ids, _, _ in rows)
        batch = {
            "input_ids": torch.full((len(rows), T), self.tokenizer.pad_id, dtype=torch.long),
            "attention_mask": torch.zeros(len(rows), T, dtype=torch.long),
            "token_type_ids": torch.zeros(len(rows), T, dtype=torch.long),  # padding is type 0
            "labels": torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long),
        }
        for b, (ids, types, labels) in enumerate(rows):
            cols = slice(T - len(ids), T) if padding_side == "left" else slice(0, len(ids))
            batch["input_ids"][b, cols] = torch.tensor(ids)
            batch["attention_mask"][b, cols] = 1
            batch["token_type_ids"][b, cols] = torch.tensor(types)
            batch["labels"][b, cols] = torch.tensor(labels)
        if suffixes is None:
            del batch["labels"]
        if per_prompt is not None:
            batch["pixel_values"] = self.pixel_values([im for group in per_prompt for im in group])
        return batch

    @staticmethod
    def _images_per_prompt(images, batch_size: int) -> list[list]:
        """Each prompt's images as a list: `images` holds one entry per prompt, an image or a list of them."""
        if isinstance(images, (Image.Image, str, Path, bytes)):
            images = [images]
        groups = [list(im) if isinstance(im, (list, tuple)) else [im] for im in images]
        if len(groups) != batch_size:
            raise PaliGemmaError(f"got {batch_size} prompts but {len(groups)} images: give one image (or one list "
                                 "of images) per prompt")
        if any(not group for group in groups):
            raise PaliGemmaError("a prompt has an empty list of images: give it at least one")
        return groups

    def pixel_values(self, images, batch_size: int | None = None):
        """float32 [B, 3, S, S] from B images (PIL images, paths, bytes, or one of them alone)."""
        if isinstance(images, (Image.Image, str, Path, bytes)):
            images = [images]
        images = [im if isinstance(im, Image.Image) else load_image(im) for im in images]
        if batch_size is not None and len(images) != batch_size:
            raise PaliGemmaError(f"got {batch_size} prompts but {len(images)} images: give one image per prompt")
        return preprocess(images, self.image_size)

    @staticmethod
    def _check_length(n: int, max_length: int | None, what: str) -> None:
        if max_length is not None and n > max_length:
            raise PaliGemmaError(f"{what} is {n} tokens; this model allows at most {max_length}")
