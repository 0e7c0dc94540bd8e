"""Many questions about one image, encoding the image once.

A PaliGemma prompt is `<image> x n | <bos> | prefix "\\n"`, and the image block is by far its longest
part (256 tokens at 224 px) and the only one that needs the vision tower. `ChatSession` prefills
`<image> x n + <bos>` into a KV cache once, snapshots it, and answers each question by restoring the
snapshot, appending the question's tokens (type 0, so they attend to the image block and to each other
both ways) and generating from there.

That is not exactly what `Pipeline.stream` computes: in a full prefill the image tokens also attend to
the question (the prefix block is bidirectional), while cached image tokens were computed before the
question existed. Answers may therefore differ slightly from `paligemma ask`; `exact=True` re-prefills
the whole prompt every time (as `ask` does) for users who want identical answers.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from PIL import Image

from paligemma_cli.errors import PaliGemmaError
from paligemma_cli.inference.generate import SamplingOptions
from paligemma_cli.inference.pipeline import GenerationStats, Pipeline
from paligemma_cli.model.kv_cache import KVCache

# Room for the question when the cache is first allocated; a longer question grows the cache.
PROMPT_BUDGET = 64


@dataclass
class Turn:
    """One answered question: what was asked about which image, the answer and its timings."""

    image: str
    prompt: str
    answer: str
    stats: GenerationStats

    def as_dict(self) -> dict:
        return {"image": self.image, "prompt": self.prompt, "answer": self.answer, "timings": self.stats.as_dict()}


@dataclass
class ChatSession:
    """Answers questions about the current image, reusing its encoding between questions.

    Args:
        pipeline: a loaded `Pipeline`; load it with `fast_layout=True`, which speeds up every question.
        opts: sampling options; may be changed between questions.
        exact: re-prefill image + question for every question, so answers equal `Pipeline.stream`.

    Example:
        chat = ChatSession(Pipeline.load("runs/demo", fast_layout=True), SamplingOptions(max_new_tokens=32))
        chat.set_image("examples/shapes.png")
        for piece in chat.ask("answer en what color is the circle?"):  # vision tower + full prefill
            print(piece, end="", flush=True)
        answer = "".join(chat.ask("caption en"))  # only the question's tokens are prefilled
        chat.last.ttft_s, chat.history[-1].answer
    """

    pipeline: Pipeline
    opts: SamplingOptions = field(default_factory=SamplingOptions)
    exact: bool = False
    image_name: str | None = field(default=None, init=False)
    history: list[Turn] = field(default_factory=list, init=False)
    last: GenerationStats = field(default_factory=GenerationStats, init=False)
    _pixels: torch.Tensor | None = field(default=None, init=False, repr=False)  # (1, 3, S, S) on the device
    _cache: KVCache | None = field(default=None, init=False, repr=False)
    # The cache right after `<image> x n + <bos>`; None until that prefill has completed.
    _snap: tuple | None = field(default=None, init=False, repr=False)

    # --- state --------------------------------------------------------------------------------

    def set_image(self, image, name: str | None = None) -> None:
        """Make `image` (a path, PIL image or encoded bytes) the one questions are about.

        The image is read and preprocessed now, so a bad path fails here; it is encoded by the vision
        tower on the next question. Raises PaliGemmaError for an unreadable image.
        """
        if isinstance(image, (str, Path)):
            image = Path(image).expanduser()
        pixels = self.pipeline.processor.pixel_values(image)
        self._pixels = pixels.to(self.pipeline.model.device)
        self.image_name = name or (str(image) if isinstance(image, Path) else "<image>")
        self._snap = None  # the cached encoding belongs to the old image

    def reset(self) -> None:
        """Forget the transcript and the cached image encoding (the image itself stays selected)."""
        self.history.clear()
        self._cache = self._snap = None

    def warm_up(self) -> None:
        """Answer a throwaway question about a blank image, so that a compiled decoder (`Pipeline.compile`)
        compiles now, not during the user's first question. Image, cache and history stay as they were."""
        saved = (self._pixels, self.image_name, self._cache, self._snap, list(self.history), self.last, self.opts)
        size = self.pipeline.model.config.vision.image_size
        self.set_image(Image.new("RGB", (size, size), "white"))
        self.opts = dataclasses.replace(self.opts, max_new_tokens=2, temperature=0.0)  # a prompt and a decode step
        try:
            "".join(self.ask("caption en"))
        finally:
            self._pixels, self.image_name, self._cache, self._snap, self.history, self.last, self.opts = saved

    @property
    def has_image(self) -> bool:
        return self._pixels is not None

    # --- asking -------------------------------------------------------------------------------

    def ask(self, prompt: str) -> Iterator[str]:
        """Stream the answer to a raw prefix such as "answer en what color is it?" or "detect circle".

        Yields text pieces as tokens are generated; afterwards `last` holds the timings and the turn
        is appended to `history`. Raises PaliGemmaError without an image or for a too-long prompt.
        """
        if self._pixels is None:
            raise PaliGemmaError("no image yet: choose one first (`/image PATH` in `paligemma chat`)")
        self.opts.validate()
        t0 = time.perf_counter()
        question = self.pipeline.tokenizer.encode(prompt + "\n")  # as the processor tokenizes the prefix
        n_prompt = self.pipeline.model.config.num_image_tokens + 1 + len(question)
        limit = self.pipeline.max_prompt_tokens(self.opts.max_new_tokens)
        if n_prompt > limit:
            raise PaliGemmaError(f"prompt is {n_prompt} tokens; this model allows at most {limit} "
                                 f"with {self.opts.max_new_tokens} new tokens")
        if self.exact:
            batch, cache = self._full_prompt(prompt), None
        else:
            batch, cache = self._question_after_image(question)
        stats = GenerationStats(prompt_tokens=n_prompt)
        pieces = []
        for piece in self.pipeline.stream_batch(batch, self.opts, stats, t0, cache):
            pieces.append(piece)
            yield piece
        self.last = stats
        self.history.append(Turn(self.image_name or "", prompt, "".join(pieces), stats))

    def _full_prompt(self, prompt: str) -> dict:
        """The whole prompt as `ask` builds it, with the stored pixels (exact mode)."""
        batch = self.pipeline.processor([prompt])
        batch = {k: v.to(self.pipeline.model.device) for k, v in batch.items()}
        batch["pixel_values"] = self._pixels
        return batch

    def _question_after_image(self, question: list[int]) -> tuple[dict, KVCache]:
        """Restore the image+bos cache (prefilling it if needed) and return the question's batch."""
        if self._snap is None:
            self._prefill_image(len(question))
        needed = self._snap[0] + len(question) + self.opts.max_new_tokens
        if needed > self._cache.max_len:
            self._grow(needed)
        self._cache.restore(self._snap)
        input_ids = torch.tensor([question], device=self.pipeline.model.device)
        # Type 0: the question joins the bidirectional prefix block, as it does in a full prefill.
        # No attention_mask: one row has no padding, and `extend` takes its cheaper path for that.
        return {"input_ids": input_ids, "token_type_ids": torch.zeros_like(input_ids)}, self._cache

    def _prefill_image(self, question_len: int) -> None:
        """Run the vision tower and prefill `<image> x n + <bos>` (type 0) into a fresh cache."""
        model, tok, decoder = self.pipeline.model, self.pipeline.tokenizer, self.pipeline.decoder
        n = model.config.num_image_tokens
        size = n + 1 + max(question_len, PROMPT_BUDGET) + self.opts.max_new_tokens
        size = min(size, model.config.text.max_position_embeddings)
        self._cache = decoder.new_cache(1, size)
        ids = torch.tensor([[tok.image_token_id] * n + [tok.bos_id]], device=model.device)
        with torch.inference_mode():
            decoder.extend(self._cache, ids, self._pixels, torch.zeros_like(ids))
        self._snap = self._cache.snapshot()  # only set once the prefill has completed

    def _grow(self, needed: int) -> None:
        """Reallocate the cache with room for `needed` slots, keeping the image block (no re-encoding)."""
        model = self.pipeline.model
        # Round up so a run of slightly longer questions does not reallocate every time.
        size = min(-(-needed // 64) * 64, model.config.text.max_position_embeddings)
        self._cache = self._cache.resized(size, self._snap)
