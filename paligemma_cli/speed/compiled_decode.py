"""Text-only decoding steps through `torch.compile`, as gpt-fast compiles its `decode_one_token`.

`PaliGemma.extend` slices the cache at `cache.length`, a Python int that grows with every token, which
`torch.compile` would see as a new constant each time and recompile for. `CompiledDecoder.extend`
therefore takes a static path for text tokens without padding (decode steps, a chat's follow-up
question): keys and values are written with `index_copy_` at slots held in a tensor and attention
covers a fixed number of slots, the ones past the new tokens masked out, so every decode step of a
cache has the same shapes and one graph serves them all (a second, with a symbolic length, serves
prompts of several tokens). Image prefill stays eager: it runs once per prompt.
"""

from __future__ import annotations

import torch

from paligemma_cli.model.kv_cache import KVCache
from paligemma_cli.model.paligemma import PaliGemma
from paligemma_cli.speed.cpu_layout import use_fast_cpu_layout

# Cache lengths are rounded up to a multiple of this, so prompts of different lengths share one graph.
COMPILED_CACHE_STEP = 256

# On the CPU the graph's kernels are called from generated C++ (inductor's `cpp_wrapper`), not Python:
# on a small model per-op costs are most of a short question (bench/results/chat-ttft-fused.out).
CPU_COMPILE_OPTIONS = {"cpp_wrapper": True}


class CompiledDecoder:
    """`new_cache` and `extend` of a PaliGemma (the interface `generate_tokens` uses), with text-only
    steps compiled. The first call of each kind pays for compiling (tens of seconds on a small CPU).

    The model's weights get their final layout first (`use_fast_cpu_layout`): the graph is specialised
    to it, and checking every parameter before every call (dynamo's guards on module state) would cost
    more than a short question's matmuls. Replacing weights afterwards needs a new `CompiledDecoder`.
    """

    def __init__(self, model: PaliGemma):
        self.model = use_fast_cpu_layout(model)
        options = {"guard_filter_fn": torch.compiler.skip_guard_on_inbuilt_nn_modules_unsafe}
        if model.device.type == "cpu":
            options |= CPU_COMPILE_OPTIONS
        self._step = torch.compile(self._slot_step, options=options)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        # The compiled step's shapes include the cache length: rounded up, prompts share a graph.
        rounded = -(-max_len // COMPILED_CACHE_STEP) * COMPILED_CACHE_STEP
        limit = self.model.config.text.max_position_embeddings
        return self.model.new_cache(batch, max(max_len, min(rounded, limit)))

    def extend(self, cache: KVCache, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
               token_type_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
               ) -> torch.Tensor:
        """`PaliGemma.extend`, through the compiled graph for text tokens without padding."""
        if pixel_values is not None or attention_mask is not None:
            return self.model.extend(cache, input_ids, pixel_values, token_type_ids, attention_mask)
        start, end, positions = cache.claim(input_ids, token_type_ids)
        cache.pos_bound = cache.max_len + 1  # a constant bound: one RoPE table size, one graph
        # Built here, not in the graph: a table made while compiling would differ from later ones and recompile.
        self.model.language_model.rope.reserve(cache.pos_bound, input_ids.device, self.model.dtype)
        slots = torch.arange(start, end, device=input_ids.device)
        valid, prefix = cache.valid, cache.prefix
        if end - start > 1:
            # A prompt: one graph with symbolic lengths serves every prompt, and it attends to the filled
            # slots only (a question is a handful of tokens after hundreds of image tokens: attending to
            # the whole cache would cost more than the question). Decode steps keep their static graph.
            valid, prefix = valid[:, :end], prefix[:, :end]
            for t, dim in ((input_ids, 1), (positions, 1), (slots, 0), (valid, 1), (prefix, 1)):
                torch._dynamo.mark_dynamic(t, dim)
        logits = self._step(cache.k, cache.v, valid, prefix, input_ids, positions, slots)
        cache.length = end
        return logits

    def _slot_step(self, k: list, v: list, valid: torch.Tensor, prefix: torch.Tensor, input_ids: torch.Tensor,
                   positions: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """(B, T) ids at cache slots `slots` (T,) -> (B, vocab) logits of the last one.

        Attention covers the first S slots of the cache, S = valid.shape[1] (the whole cache for a
        decode step); `valid` and `prefix` are the cache's slot flags, (B, S)."""
        model = self.model
        x = model.embed(input_ids)
        masks = model.attention_masks(slots, prefix[:, slots], valid, prefix)  # (B, 1, T, S)
        writer = SlotWriter(k, v, slots, valid.shape[1], k[0].shape[2] + 1)
        h = model.language_model(x, positions, masks, writer, last_only=True)
        return model.language_model.logits(h[:, -1])


class SlotWriter:
    """What the attention layers need of a cache (`write`, `pos_bound`) for `CompiledDecoder._slot_step`:
    keys and values go in at slots held in a tensor, and attention sees the first `seen` slots."""

    def __init__(self, k: list, v: list, slots: torch.Tensor, seen: int, pos_bound: int):
        self.k, self.v, self.slots, self.seen, self.pos_bound = k, v, slots, seen, pos_bound

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, n_kv, T, hd) at the slots; return the first `seen` slots of the layer's buffers."""
        self.k[layer].index_copy_(2, self.slots, k)
        self.v[layer].index_copy_(2, self.slots, v)
        return self.k[layer][:, :, :self.seen], self.v[layer][:, :, :self.seen]
