"""Token generation as a chain of small functions: sample -> prefill -> decode steps -> a generator.

As in gpt-fast and litgpt: `generate_tokens` yields one (B,) tensor of token ids per step, so the CLI
streams by iterating it and batch callers collect it. Greedy is the default (big_vision's default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch

from paligemma_cli.errors import PaliGemmaError


@dataclass
class SamplingOptions:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 means greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def validate(self) -> "SamplingOptions":
        if self.max_new_tokens < 1:
            raise PaliGemmaError(f"--max-tokens must be at least 1, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise PaliGemmaError(f"--temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise PaliGemmaError(f"--top-k must be at least 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:  # also refuses NaN
            raise PaliGemmaError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise PaliGemmaError(f"--seed must be between 0 and 2**64 - 1, got {self.seed}")
        return self


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the top-p nucleus. logits: (B, V)."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits.float(), dim=-1)
        # Keep the smallest prefix whose mass reaches top_p: a token is dropped when the mass before it
        # already does. The most likely token always stays.
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: torch.Tensor, opts: SamplingOptions, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids."""
    if opts.temperature <= 0:
        return logits.argmax(-1)
    logits = filter_logits(logits.float() / opts.temperature, opts.top_k, opts.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def generate_tokens(decoder, batch: dict, opts: SamplingOptions, eos_id: int = 1, pad_id: int = 0,
                    cache=None) -> Iterator[torch.Tensor]:
    """Yield (B,) new token ids per step until every row has produced `eos_id` or the limit is hit.

    `decoder` is what `new_cache` and `extend` are called on: a `PaliGemma`, or a `CompiledDecoder`.
    `batch` holds left-padded `input_ids`, `attention_mask`, `token_type_ids` and `pixel_values`.
    Rows that are done keep yielding `pad_id`. A `cache` may be passed in (e.g. to reuse it).
    """
    opts.validate()
    ids = batch["input_ids"]
    B, T = ids.shape
    if cache is None:
        cache = decoder.new_cache(B, T + opts.max_new_tokens)
    generator = None
    if opts.seed is not None:
        generator = torch.Generator(device=ids.device).manual_seed(opts.seed)
    with torch.inference_mode():
        logits = decoder.extend(cache, ids, batch.get("pixel_values"), batch.get("token_type_ids"),
                              batch.get("attention_mask"))
        done = None  # (B,) bool once the first token is out: the first one is yielded as soon as sampled
        for step in range(opts.max_new_tokens):
            token = sample(logits, opts, generator)
            if done is not None:
                token = token.masked_fill(done, pad_id)
            yield token
            done = token == eos_id if done is None else done | (token == eos_id)
            if step == opts.max_new_tokens - 1 or bool(done.all()):
                return
            logits = decoder.extend(cache, token[:, None])


def generate(decoder, batch: dict, opts: SamplingOptions, eos_id: int = 1, pad_id: int = 0) -> torch.Tensor:
    """(B, n) new token ids, n <= max_new_tokens, `pad_id` after each row's `eos_id`."""
    steps = list(generate_tokens(decoder, batch, opts, eos_id, pad_id))
    return torch.stack(steps, dim=1)
