"""PaliGemma: SigLIP vision tower -> linear projector -> Gemma decoder with a prefix-LM mask.

References: Beyer et al., "PaliGemma: A versatile 3B VLM for transfer" (2024); Steiner et al.,
"PaliGemma 2" (2024); big_vision's `paligemma` model; `transformers.models.paligemma`.

The projected image features replace the `<image>` placeholder embeddings in order; text embeddings
are scaled by sqrt(hidden), image features are not. RoPE positions count real tokens from 1.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from paligemma_cli.model.mask import prefix_lm_mask
from paligemma_cli.model.config import PaliGemmaConfig
from paligemma_cli.errors import PaliGemmaError
from paligemma_cli.model.gemma import GemmaDecoder
from paligemma_cli.model.kv_cache import KVCache
from paligemma_cli.model.siglip import SiglipVisionTower


COMPILED_CACHE_STEP = 256  # cache lengths of a compiled model are multiples of this

# Inductor settings for `compile_decode` on the CPU: the graph's kernels are called from generated C++
# rather than Python. On a small model per-op costs are most of a short question: the demo model's
# follow-up question in `chat --compile` took 2.0-2.6 ms with the Python wrapper, 1.6-1.8 ms with the C++
# one (bf16, one thread, medians of 30 follow-ups in each of 2-4 runs). Compiling takes longer the first
# time (~22 s instead of ~6 s for the demo model), then comes from inductor's on-disk cache (~5 s).
CPU_COMPILE_OPTIONS = {"cpp_wrapper": True}

# `use_fast_cpu_layout` merges projections that read the same input (q|k|v, gate|up) when together they
# hold at most this many bytes. Merging saves a matmul call's fixed cost (~20-30 us measured in place on
# the demo model) and costs a copy of the weights while loading: it pays for small matmuls, where that
# fixed cost is a large share (the demo model: all of them), and not for large ones (PaliGemma 3B's
# gate|up, 134 MB a layer: decoding 4.4-4.7 tok/s either way, loading 3.5 s slower when merged).
FUSE_MAX_BYTES = 16 << 20


class MultiModalProjector(nn.Module):
    def __init__(self, cfg: PaliGemmaConfig):
        super().__init__()
        self.linear = nn.Linear(cfg.vision.hidden_size, cfg.text.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class PaliGemma(nn.Module):
    def __init__(self, cfg: PaliGemmaConfig):
        super().__init__()
        self.config = cfg
        self.vision_tower = SiglipVisionTower(cfg.vision)
        self.multi_modal_projector = MultiModalProjector(cfg)
        self.language_model = GemmaDecoder(cfg.text)
        self._compiled_step = None  # set by `compile_decode`

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None) -> "PaliGemma":
        from paligemma_cli.checkpoints.hf import load_model

        return load_model(path, dtype=dtype, device=device)

    def save_pretrained(self, folder: str | Path, **kwargs) -> Path:
        from paligemma_cli.checkpoints.hf import save_model

        return save_model(self, folder, **kwargs)

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.language_model.embed_tokens.weight.device

    def use_fast_cpu_layout(self) -> "PaliGemma":
        """Give the CPU's linear weights the layout its matmuls are fastest with (for inference only).

        float32: stored column-major, same shapes and values. `nn.Linear` computes `x @ W.T`; for the
        few rows of a question or a decode step, MKL's float32 GEMM was much faster with `W.T`
        contiguous (demo model's shapes, one thread, 1 or 16 rows: 0.5-0.7x the time, 83 rows 0.8-0.9x).
        `save_pretrained` writes contiguous copies, so checkpoints do not change.
        bfloat16: `nn.Linear`s become `PackedLinear`s (oneDNN's blocked layout, bit-identical outputs,
        ~1.3x faster matrix-vector products; see `core/packed_linear.py`), a decoder layer's q|k|v and
        gate|up projections first merged into one linear each where they are small (`FUSE_MAX_BYTES`,
        `core/fused_linear.py`). A packed model cannot be trained or saved. The tied output head stays as
        it is: packing it would need a second copy of the embedding table. GPU weights and int8 ones are
        left alone. Idempotent; returns the model.
        """
        from paligemma_cli.speed.fused_projections import fuse_linears
        from paligemma_cli.speed.mapped_pages import release_mapped_pages, safetensors_mappings
        from paligemma_cli.speed.packed_linear import PackedLinear, can_pack

        mappings = safetensors_mappings()
        for layer in self.language_model.layers:
            for block, names, fused in ((layer.self_attn, ("q_proj", "k_proj", "v_proj"), "qkv_proj"),
                                        (layer.mlp, ("gate_proj", "up_proj"), "gate_up_proj")):
                linears = [getattr(block, name, None) for name in names]
                if (all(type(m) is nn.Linear and can_pack(m.weight) for m in linears)  # not LoRA, int8, fp32
                        and sum(m.weight.nbytes for m in linears) <= FUSE_MAX_BYTES):
                    for w in fuse_linears(block, names, fused):
                        release_mapped_pages(w, mappings)
        for parent in list(self.modules()):
            for name, module in list(parent.named_children()):
                if type(module) is not nn.Linear:
                    continue
                w = module.weight
                if can_pack(w):
                    setattr(parent, name, PackedLinear(module))
                    # The packed copy replaces the weight: its pages in the checkpoint's mapping, read to
                    # pack it, would otherwise stay counted in memory beside the copy.
                    release_mapped_pages(w, mappings)
                elif w.device.type == "cpu" and w.dtype == torch.float32 and w.is_contiguous():
                    module.weight.data = w.data.t().contiguous().t()
        return self

    # --- building blocks ---------------------------------------------------------------------

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, N, D_text)."""
        return self.multi_modal_projector(self.vision_tower(pixel_values.to(self.dtype)))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids -> (B, T, D) embeddings with image features in the `<image>` slots."""
        if pixel_values is None and self.config.image_token_id < self.config.text.vocab_size:
            return self.language_model.embed(input_ids)  # text only (a question, a decode step)
        is_image = input_ids == self.config.image_token_id
        if self.config.image_token_id >= self.config.text.vocab_size:
            # Small checkpoints may put <image> past the embedding table; its row is replaced anyway.
            input_ids = input_ids.masked_fill(is_image, 0)
        x = self.language_model.embed(input_ids)
        if pixel_values is None:
            return x
        feats = self.image_features(pixel_values).to(x.dtype)  # (B, N, D)
        if int(is_image.sum()) != feats.shape[0] * feats.shape[1]:
            raise PaliGemmaError(
                f"the prompt has {int(is_image.sum())} <image> tokens but the images give "
                f"{feats.shape[0] * feats.shape[1]} features"
            )
        return x.masked_scatter(is_image[..., None], feats)

    def _masks(self, q_slots, q_prefix, kv_valid, kv_prefix) -> dict:
        windows = {layer.window for layer in self.language_model.layers}
        return {w: prefix_lm_mask(q_slots, q_prefix, kv_valid, kv_prefix, w) for w in windows}

    # --- full forward (training, scoring) ---------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                ) -> torch.Tensor:
        """Logits (B, T, vocab) for every position, with no cache."""
        h = self.hidden_states(input_ids, pixel_values, token_type_ids, attention_mask)
        return self.language_model.logits(h)

    def hidden_states(self, input_ids, pixel_values=None, token_type_ids=None, attention_mask=None) -> torch.Tensor:
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        real = attention_mask.bool()
        prefix = (token_type_ids == 0) & real
        positions = real.long().cumsum(-1).masked_fill(~real, 1)
        x = self.embed(input_ids, pixel_values)
        masks = self._masks(torch.arange(T, device=input_ids.device), prefix, real, prefix)
        return self.language_model(x, positions, masks)

    # --- incremental decoding ---------------------------------------------------------------------

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        t = self.config.text
        if self._compiled_step is not None:
            # The compiled step's shapes include the cache length: round it up, so that prompts of
            # different lengths share one graph instead of compiling one each.
            rounded = -(-max_len // COMPILED_CACHE_STEP) * COMPILED_CACHE_STEP
            max_len = max(max_len, min(rounded, t.max_position_embeddings))
        return KVCache.allocate(t.num_hidden_layers, batch, t.num_key_value_heads, t.head_dim, max_len,
                                self.dtype, self.device)

    def extend(self, cache: KVCache, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
               token_type_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
               ) -> torch.Tensor:
        """Append (B, T) tokens to the cache and return the logits of the last slot, (B, vocab).

        Prefill is the first call (with the image); each decode step is a call with T = 1. Rows are kept
        aligned by padding, which must be on the left of a prompt so that the last slot is real.
        `attention_mask=None` means no padding; `token_type_ids=None` means all suffix (type 1).
        Only the last slot's logits are computed, so the last layer skips the other slots' attention
        output and MLP (their keys and values still go into the cache).
        """
        if self._compiled_step is not None and pixel_values is None and attention_mask is None:
            return self._static_extend(cache, input_ids, token_type_ids)
        start, end, positions = self._claim_slots(cache, input_ids, token_type_ids, attention_mask)
        x = self.embed(input_ids, pixel_values)
        q_slots = torch.arange(start, end, device=input_ids.device)
        masks = self._masks(q_slots, cache.prefix[:, start:end], cache.valid[:, :end], cache.prefix[:, :end])
        h = self.language_model(x, positions, masks, cache, last_only=True)  # (B, 1, D)
        cache.length = end
        return self.language_model.logits(h[:, -1])

    def _claim_slots(self, cache: KVCache, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None,
                     attention_mask: torch.Tensor | None) -> tuple[int, int, torch.Tensor]:
        """Mark slots [start, end) of the cache for (B, T) new tokens (real/padding, prefix/suffix), advance
        the rows' next RoPE positions, and return (start, end, positions (B, T)). `cache.length` is left
        to the caller, to move once the tokens' keys and values are in."""
        T = input_ids.shape[1]
        start, end = cache.length, cache.length + T
        if end > cache.max_len:
            raise PaliGemmaError(f"sequence of {end} tokens exceeds the cache ({cache.max_len})")
        if attention_mask is None:  # every new slot holds a real token: the common case, kept cheap
            cache.valid[:, start:end] = True
            prefix = token_type_ids == 0 if token_type_ids is not None else None
            positions = cache.next_pos[:, None] + torch.arange(T, device=input_ids.device)
            cache.next_pos += T
        else:
            real = attention_mask.bool()
            cache.valid[:, start:end] = real
            prefix = (token_type_ids == 0) & real if token_type_ids is not None else None
            counts = real.long().cumsum(-1)
            positions = (cache.next_pos[:, None] + counts - 1).masked_fill(~real, 1)
            cache.next_pos += counts[:, -1]
        cache.pos_bound += T  # next_pos grew by at most T
        if prefix is None:  # generated tokens belong to the causal suffix
            cache.prefix[:, start:end] = False
        else:
            cache.prefix[:, start:end] = prefix
        return start, end, positions

    # --- compiled decoding (opt-in) ---------------------------------------------------------------

    def compile_decode(self) -> "PaliGemma":
        """Run text-only `extend` calls (decode steps, a chat's follow-up question) through `torch.compile`.

        `extend` slices the cache at `cache.length`, a Python int that grows with every token, which
        `torch.compile` would see as a new constant each time, recompiling at every step. The compiled
        path is therefore a static one (gpt-fast's): it attends over all `max_len` slots of the cache,
        the slots past the new tokens masked out, and writes keys and values with `index_copy_` at slots
        given as a tensor, so every decode step of a cache has the same shapes and one graph serves them
        all (a second, with a symbolic length, serves prompts of several tokens). Image prefill stays
        eager: it runs once per prompt. The first call of each kind pays for compiling (tens of seconds
        on a small CPU). Returns the model.
        """
        # The weights' final layout first: the graph is specialised to it, and checking every parameter
        # before every call (dynamo's guards on module state) costs more than a short question's matmuls.
        # So replacing weights after compiling needs a new `compile_decode`.
        self.use_fast_cpu_layout()
        options = {"guard_filter_fn": torch.compiler.skip_guard_on_inbuilt_nn_modules_unsafe}
        if self.device.type == "cpu":
            options |= CPU_COMPILE_OPTIONS
        self._compiled_step = torch.compile(self._slot_step, options=options)
        return self

    def _static_extend(self, cache: KVCache, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None):
        """`extend` for text tokens without padding, through the compiled graph (see `compile_decode`)."""
        start, end, positions = self._claim_slots(cache, input_ids, token_type_ids, None)
        T = end - start
        cache.pos_bound = cache.max_len + 1  # a constant bound: one RoPE table size, one graph
        # Built here, not in the graph: a table made while compiling would differ from later ones and recompile.
        self.language_model.rope.reserve(cache.pos_bound, input_ids.device, self.dtype)
        slots = torch.arange(start, end, device=input_ids.device)
        valid, prefix = cache.valid, cache.prefix
        if T > 1:
            # A prompt: one graph with symbolic lengths serves every prompt, and it attends to the filled
            # slots only (a question is a handful of tokens after hundreds of image tokens: attending to
            # the whole cache would cost more than the question). Decode steps keep their static graph.
            valid, prefix = valid[:, :end], prefix[:, :end]
            for t, dim in ((input_ids, 1), (positions, 1), (slots, 0), (valid, 1), (prefix, 1)):
                torch._dynamo.mark_dynamic(t, dim)
        logits = self._compiled_step(cache.k, cache.v, valid, prefix, input_ids, positions, slots)
        cache.length = end
        return logits

    def _slot_step(self, k: list, v: list, valid: torch.Tensor, prefix: torch.Tensor, input_ids: torch.Tensor,
                   positions: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """(B, T) ids at cache slots `slots` (T,) -> (B, vocab) logits of the last one.

        Attention covers the first S slots of the cache, S = valid.shape[1] (the whole cache for a
        decode step); `valid` and `prefix` are the cache's slot flags, (B, S)."""
        x = self.embed(input_ids)
        masks = self._masks(slots, prefix[:, slots], valid, prefix)  # (B, 1, T, S)
        writer = SlotWriter(k, v, slots, valid.shape[1], k[0].shape[2] + 1)
        h = self.language_model(x, positions, masks, writer, last_only=True)
        return self.language_model.logits(h[:, -1])


class SlotWriter:
    """What the attention layers need of a cache (`write`, `pos_bound`) for `PaliGemma._slot_step`:
    keys and values go in at slots held in a tensor, and attention sees the first `seen` slots."""

    def __init__(self, k: list, v: list, slots: torch.Tensor, seen: int, pos_bound: int):
        self.k, self.v, self.slots, self.seen, self.pos_bound = k, v, slots, seen, pos_bound

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, n_kv, T, hd) at the slots; return the first `seen` slots of the layer's buffers."""
        self.k[layer].index_copy_(2, self.slots, k)
        self.v[layer].index_copy_(2, self.slots, v)
        return self.k[layer][:, :, :self.seen], self.v[layer][:, :, :self.seen]
