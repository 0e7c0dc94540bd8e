"""Model + tokenizer + processor, loaded together, and the generation calls every command uses.

`Pipeline.stream` yields text pieces as tokens are generated (the CLI prints them as they come);
`Pipeline.generate` answers a batch at once. Both record timings in `Pipeline.last`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch

from paligemma_cli.checkpoints.hf import load_model
from paligemma_cli.device import pick_device, pick_dtype
from paligemma_cli.errors import PaliGemmaError
from paligemma_cli.inference.generate import SamplingOptions, generate_tokens
from paligemma_cli.model.paligemma import PaliGemma
from paligemma_cli.processing.processor import PaliGemmaProcessor
from paligemma_cli.processing.tokenizer import PaliGemmaTokenizer
from paligemma_cli.speed.compiled_decode import CompiledDecoder
from paligemma_cli.speed.cpu_layout import use_fast_cpu_layout
from paligemma_cli.speed.kernel_choice import use_int8_kernels
from paligemma_cli.speed.quantize import is_quantized, parse_quantize


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    ttft_s: float = 0.0  # vision + prefill + first sample
    total_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        decode = self.total_s - self.ttft_s
        return (self.new_tokens - 1) / decode if self.new_tokens > 1 and decode > 0 else 0.0

    def as_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens,
                "ttft_s": round(self.ttft_s, 4), "total_s": round(self.total_s, 4),
                "tokens_per_s": round(self.tokens_per_s, 2)}


@dataclass
class Pipeline:
    """A loaded checkpoint: `model`, its `tokenizer` and `processor`, and the `decoder` that generation
    calls (`new_cache`, `extend`): the model itself, or a `CompiledDecoder` after `compile()`."""

    model: PaliGemma
    tokenizer: PaliGemmaTokenizer
    processor: PaliGemmaProcessor
    folder: Path
    load_s: float = 0.0
    last: GenerationStats = field(default_factory=GenerationStats)
    decoder: object = None

    def __post_init__(self) -> None:
        if self.decoder is None:
            self.decoder = self.model

    @classmethod
    def load(cls, folder: str | Path, device: str = "auto", dtype: str = "auto",
             quantize: str | None = "none", fast_layout: bool = False) -> "Pipeline":
        """Model, tokenizer and processor of a checkpoint folder. `quantize="int8"`: int8 decoder weights
        (see `core.quantize`), made while loading; a folder saved quantized is int8 either way.

        `fast_layout`: give the weights the CPU's fastest layout (`use_fast_cpu_layout`) at a one-time
        cost of seconds on a 3B model, worth it for sessions that decode many tokens (chat, captioning a
        folder, eval), not for one short answer, which is better served by the memory-mapped weights as
        they are (see docs/speed.md).
        """
        t0 = time.perf_counter()
        folder = Path(folder)
        quantize = parse_quantize(quantize)
        dev = pick_device(device)
        model = load_model(folder, dtype=pick_dtype(dtype, dev), device=dev, quantize=quantize)
        if is_quantized(model):
            use_int8_kernels(model)
        if fast_layout:
            use_fast_cpu_layout(model)
        tokenizer = PaliGemmaTokenizer.from_folder(folder)
        if tokenizer.image_token_id != model.config.image_token_id:
            raise PaliGemmaError(
                f"'{folder}': the tokenizer's <image> id ({tokenizer.image_token_id}) is not the model's "
                f"({model.config.image_token_id}); the tokenizer.model does not belong to these weights"
            )
        processor = PaliGemmaProcessor(tokenizer, model.config.image_size, model.config.num_image_tokens)
        return cls(model, tokenizer, processor, folder, load_s=time.perf_counter() - t0)

    def compile(self) -> "Pipeline":
        """Decode through `torch.compile` from now on (see `CompiledDecoder`); returns the pipeline."""
        if not isinstance(self.decoder, CompiledDecoder):
            self.decoder = CompiledDecoder(self.model)
        return self

    def max_prompt_tokens(self, max_new_tokens: int) -> int:
        """How long a prompt may be so that `max_new_tokens` still fit the model's positions."""
        context = self.model.config.text.max_position_embeddings
        num_image_tokens = self.model.config.num_image_tokens
        if max_new_tokens > context - num_image_tokens - 2:  # room for the image, <bos> and "\n"
            raise PaliGemmaError(f"--max-tokens {max_new_tokens} leaves no room for the prompt: this model reads "
                                 f"{context} tokens in all, {num_image_tokens} of them the image's")
        return context - max_new_tokens

    def prepare(self, images: Sequence, prompts: Sequence[str], max_new_tokens: int) -> dict:
        """A left-padded batch on the model's device; one entry of `images` per prompt: a PIL image, path
        or bytes, or a list of them for a prompt about several images."""
        batch = self.processor(list(prompts), images=list(images), padding_side="left",
                               max_length=self.max_prompt_tokens(max_new_tokens))
        return {k: v.to(self.model.device) for k, v in batch.items()}

    def stream(self, image, prompt: str, opts: SamplingOptions) -> Iterator[str]:
        """Yield the answer's text piece by piece as it is generated: one prompt about `image`, or about
        each image of a list in turn (PaliGemma's multi-image prompts)."""
        t0 = time.perf_counter()
        batch = self.prepare([image], [prompt], opts.max_new_tokens)
        stats = GenerationStats(prompt_tokens=int(batch["input_ids"].shape[1]))
        yield from self.stream_batch(batch, opts, stats, t0)
        self.last = stats

    def stream_batch(self, batch: dict, opts: SamplingOptions, stats: GenerationStats, t0: float,
                     cache=None) -> Iterator[str]:
        """Text pieces of a one-row batch's answer, filling `stats` (timings from `t0`) as it goes."""
        text = self.tokenizer.stream()
        eos = self.tokenizer.eos_id
        for step, token in enumerate(generate_tokens(self.decoder, batch, opts, eos, self.tokenizer.pad_id, cache)):
            tid = int(token[0])  # the one sync per token that streaming needs
            if step == 0:
                stats.ttft_s = time.perf_counter() - t0
            if tid == eos:
                break
            stats.new_tokens += 1
            piece = text.push(tid)
            if piece:
                yield piece
        tail = text.flush()
        if tail:
            yield tail
        stats.total_s = time.perf_counter() - t0

    def generate(self, images: Sequence, prompts: Sequence[str], opts: SamplingOptions) -> list[str]:
        """Answer a batch of (image, prompt) pairs, an image being a list of them for a multi-image
        prompt; returns one string per pair."""
        t0 = time.perf_counter()
        batch = self.prepare(images, prompts, opts.max_new_tokens)
        steps = []
        eos = self.tokenizer.eos_id
        for step, token in enumerate(generate_tokens(self.decoder, batch, opts, eos, self.tokenizer.pad_id)):
            if step == 0:
                ttft = time.perf_counter() - t0
            steps.append(token)
        ids = torch.stack(steps, 1).tolist()
        texts = []
        for row in ids:
            if eos in row:
                row = row[: row.index(eos)]
            texts.append(self.tokenizer.decode(row))
        self.last = GenerationStats(prompt_tokens=int(batch["input_ids"].shape[1]),
                                    new_tokens=len(steps), ttft_s=ttft, total_s=time.perf_counter() - t0)
        return texts
