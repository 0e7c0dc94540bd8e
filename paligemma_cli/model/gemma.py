"""Gemma 1 and Gemma 2 decoders, as PaliGemma uses them.

References: Gemma Team, "Gemma" (2024) and "Gemma 2" (2024); `transformers.models.gemma2`;
google-deepmind/gemma. The two differ in a few places, each switched by `TextConfig`:
Gemma 2 adds norms after attention and MLP, scales queries by `query_pre_attn_scalar`, soft-caps
attention scores and final logits, and uses a sliding window on its even layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from paligemma_cli.model.config import TextConfig
from paligemma_cli.model.kv_cache import KVCache


class TiedEmbedding(nn.Embedding):
    """The token table, which is also the output head (Gemma ties them): `attend` is `h @ table.T`."""

    def attend(self, h: torch.Tensor) -> torch.Tensor:
        """(…, D) -> (…, vocab) scores against every row of the table."""
        return h @ self.weight.T


class RMSNorm(nn.Module):
    """`x * rsqrt(mean(x²) + eps) * (1 + w)` in float32; the stored weight is `w` (zero = identity)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        xf = x if x.dtype == torch.float32 else x.float()  # skip no-op casts: this runs 2L+1 times a forward
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        y = y * (1.0 + (w if w.dtype == torch.float32 else w.float()))
        return y if y.dtype == x.dtype else y.type_as(x)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin of shape (B, 1, T, head_dim) for integer positions (B, T); angles in float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    freqs = positions[..., None].float() * inv_freq  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, hd): half-split, not interleaved
    return emb.cos().to(dtype), emb.sin().to(dtype)


class RopeTable:
    """cos and sign-folded sin of positions 0..n-1, computed once and gathered per forward pass.

    The same numbers as `rope_cos_sin` (the same float32 angle arithmetic), but a forward pass pays two
    gathers instead of about a dozen small ops, which matters for a short question on a small model.
    `sin_folded` is `sin` with the first half negated, so `apply_rope_folded` needs no negation:
    `(-x2) * sin == x2 * (-sin)` exactly. Like gpt-fast's `freqs_cis` the table is precomputed, but it
    grows by doubling as longer sequences come (from 256 positions), so a short chat never pays for
    8192. It is kept per device and dtype and is not a parameter or a buffer: checkpoints do not see it.
    """

    def __init__(self, head_dim: int, theta: float):
        self.head_dim, self.theta = head_dim, theta
        self._tables: dict = {}

    def lookup(self, positions: torch.Tensor, bound: int, dtype: torch.dtype):
        """(cos, sin_folded), each (B, T, 1, head_dim), for positions (B, T) that are all below `bound`.

        `bound` is a Python int, so that the size check never waits for the device.
        """
        cos, sin = self.reserve(bound, positions.device, dtype)
        return cos[positions][:, :, None], sin[positions][:, :, None]

    def reserve(self, bound: int, device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The table for (device, dtype), built or grown now if it has fewer than `bound` positions."""
        key = (torch.device(device), dtype)
        table = self._tables.get(key)
        if table is None or table[0].shape[0] < bound:
            n = max(256, 1 << (bound - 1).bit_length())
            table = self._tables[key] = self._build(n, key[0], dtype)
        return table

    def _build(self, n: int, device, dtype):
        # Plain tensors even when first needed under inference_mode, so that training can use them too.
        with torch.inference_mode(False), torch.no_grad():
            cos, sin = rope_cos_sin(torch.arange(n, device=device)[None], self.head_dim, self.theta, dtype)
            cos, sin = cos[0, 0], sin[0, 0]  # (n, hd)
            half = self.head_dim // 2
            return cos, torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)


def apply_rope_folded(x: torch.Tensor, cos: torch.Tensor, sin_folded: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, half-split: `x * cos + rotate_half(x) * sin`, with rotate_half's sign already
    in `sin_folded` (see `RopeTable`)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((x2, x1), dim=-1) * sin_folded


def attention_bias(mask: torch.Tensor, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """Boolean (B, 1, T, S) mask -> additive (B, 1, T*G, S) bias (0 or -inf), row t*G + g for query t.

    `GemmaAttention` stacks the G query heads that share a kv head along the query axis, token-major,
    so the mask row of each token is repeated G times. Built once per forward pass and shared by every
    layer with the same window; it holds what SDPA itself makes of a boolean mask (0 where allowed,
    -inf elsewhere), so the results are the same as passing the mask.
    """
    B, _, T, S = mask.shape
    if groups > 1:
        mask = mask[:, :, :, None].expand(B, 1, T, groups, S).reshape(B, 1, T * groups, S)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


class GemmaAttention(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = cfg, layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scale = cfg.attn_scale
        self.softcap = cfg.attn_logit_softcapping if cfg.is_gemma2 else None
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)

    def project(self, x: torch.Tensor, last_only: bool = False):
        """x (B, T, D) -> q (B, T', H*hd), k and v (B, T, KV*hd); T' = 1 with `last_only`, else T."""
        return self.q_proj(x[:, -1:] if last_only else x), self.k_proj(x), self.v_proj(x)

    def forward(self, x, cos, sin, bias, cache: KVCache | None = None, last_only: bool = False) -> torch.Tensor:
        """x: (B, T, D); cos, sin: (B, T, 1, hd) from `RopeTable`; bias: (B, 1, T*G, S) from `attention_bias`.

        With `last_only`, keys and values are computed (and cached) for all T tokens but the query only for
        the last one, and (B, 1, D) is returned; `bias` must then hold only the last token's G rows.
        """
        B, T, _ = x.shape
        H, KV, hd = self.n_heads, self.n_kv, self.head_dim
        G = H // KV
        q, k, v = self.project(x, last_only)
        k = apply_rope_folded(k.view(B, T, KV, hd), cos, sin).transpose(1, 2)  # (B, KV, T, hd)
        v = v.view(B, T, KV, hd).transpose(1, 2)
        if last_only:
            cos, sin, T = cos[:, -1:], sin[:, -1:], 1
        q = apply_rope_folded(q.view(B, T, H, hd), cos, sin)  # (B, T, H, hd)
        if cache is not None:
            k, v = cache.write(self.layer_idx, k, v)  # (B, KV, S, hd)
        # Grouped-query attention without repeating K/V: the G query heads that share a kv head are
        # stacked along the query axis (row t*G + g), so one batched matmul serves them all. Token-major
        # order makes this a view, not a copy, when there is one kv head (PaliGemma 1, the demo model).
        q = q.view(B, T, KV, G, hd).transpose(1, 2).reshape(B, KV, T * G, hd)
        if self.softcap:
            scores = (q @ k.transpose(-1, -2)) * self.scale
            scores = torch.tanh(scores / self.softcap) * self.softcap + bias  # cap before the mask, as trained
            y = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        y = y.view(B, KV, T, G, hd).transpose(1, 2).reshape(B, T, H * hd)
        return self.o_proj(y)


class GemmaMLP(nn.Module):
    """GeGLU: down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gate_proj(x), self.up_proj(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class GemmaDecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.gemma2 = cfg.is_gemma2
        self.window = cfg.layer_window(layer_idx)
        eps = cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.self_attn = GemmaAttention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.mlp = GemmaMLP(cfg)
        if self.gemma2:
            self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps)
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps)

    def forward(self, x, cos, sin, bias, cache=None, last_only: bool = False) -> torch.Tensor:
        a = self.self_attn(self.input_layernorm(x), cos, sin, bias, cache, last_only)
        if last_only:  # only the last position goes on (its K/V for every position are in the cache)
            x = x[:, -1:]
        if self.gemma2:
            h = x + self.post_attention_layernorm(a)
            return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        h = x + a
        return h + self.mlp(self.post_attention_layernorm(h))


class GemmaDecoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = TiedEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(GemmaDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gradient_checkpointing = False
        self.rope = RopeTable(cfg.head_dim, cfg.rope_theta)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(ids)
        # The normalizer is cast to the activation dtype first, as Gemma was trained (45.25, not 45.2548, in bf16).
        return x * torch.tensor(self.config.hidden_size**0.5, dtype=x.dtype)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, masks: dict, cache: KVCache | None = None,
                last_only: bool = False):
        """x: (B, T, D) input embeddings; positions: (B, T); masks: window -> (B, 1, T, S). Returns (B, T, D).

        With `last_only` (incremental decoding, where only the last slot's logits are wanted) the last
        layer computes its attention output and MLP for the last position only and (B, 1, D) is
        returned; every layer's keys and values still reach the cache for all T positions.
        """
        B, T, _ = x.shape
        # Without a cache a position counts the real tokens up to its slot, so it is at most T; with one,
        # `PaliGemma.extend` has already advanced the host-side bound `KVCache.pos_bound` past these T.
        bound = T + 1 if cache is None else cache.pos_bound
        cos, sin = self.rope.lookup(positions, bound, x.dtype)
        G = self.config.num_attention_heads // self.config.num_key_value_heads
        biases = {w: attention_bias(m, G, x.dtype) for w, m in masks.items()}
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            bias = biases[layer.window]
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, bias, use_reentrant=False)
            elif last_only and i == last:  # the last token's G rows of the stacked bias
                x = layer(x, cos, sin, bias[:, :, -G:], cache, True)
            else:
                x = layer(x, cos, sin, bias, cache)
        return self.norm(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(…, D) -> (…, vocab) through the tied embedding, soft-capped on Gemma 2."""
        logits = self.embed_tokens.attend(h)
        cap = self.config.final_logit_softcapping if self.config.is_gemma2 else None
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits
