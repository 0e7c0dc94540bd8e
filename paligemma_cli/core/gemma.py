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

from paligemma_cli.core.config import TextConfig
from paligemma_cli.core.kv_cache import KVCache


class RMSNorm(nn.Module):
    """`x * rsqrt(mean(x²) + eps) * (1 + w)` in float32; the stored weight is `w` (zero = identity)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).type_as(x)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin of shape (B, 1, T, head_dim) for integer positions (B, T); angles in float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    freqs = positions[..., None].float() * inv_freq  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, hd): half-split, not interleaved
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class GemmaAttention(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scale = cfg.attn_scale
        self.softcap = cfg.attn_logit_softcapping if cfg.is_gemma2 else None
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        H, KV, hd = self.n_heads, self.n_kv, self.head_dim
        G = H // KV
        q = self.q_proj(x).view(B, T, H, hd).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, KV, hd).transpose(1, 2)  # (B, KV, T, hd)
        v = self.v_proj(x).view(B, T, KV, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.write(self.layer_idx, k, v)  # (B, KV, S, hd)
        # Grouped-query attention without repeating K/V: the G query heads that share a kv head are
        # stacked along the query axis, so one batched matmul serves them all.
        q = q.reshape(B, KV, G * T, hd)
        S = k.shape[2]
        mask = mask[:, :, None].expand(B, 1, G, T, S).reshape(B, 1, G * T, S)
        if self.softcap:
            scores = (q @ k.transpose(-1, -2)) * self.scale
            scores = torch.tanh(scores / self.softcap) * self.softcap  # before the mask, as trained
            scores = scores.masked_fill(~mask, float("-inf"))
            y = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        y = y.view(B, KV, G, T, hd).reshape(B, H, T, hd).transpose(1, 2).reshape(B, T, H * hd)
        return self.o_proj(y)


class GemmaMLP(nn.Module):
    """GeGLU: down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


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

    def forward(self, x, cos, sin, mask, cache=None) -> torch.Tensor:
        a = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        if self.gemma2:
            h = x + self.post_attention_layernorm(a)
            return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        h = x + a
        return h + self.mlp(self.post_attention_layernorm(h))


class GemmaDecoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(GemmaDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gradient_checkpointing = False

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.embed_tokens.weight
        # The normalizer is cast to the weight dtype first, as Gemma was trained (45.25, not 45.2548, in bf16).
        return F.embedding(ids, w) * torch.tensor(self.config.hidden_size**0.5, dtype=w.dtype)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, masks: dict, cache: KVCache | None = None):
        """x: (B, T, D) input embeddings; positions: (B, T); masks: window -> (B, 1, T, S). Returns (B, T, D)."""
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        for layer in self.layers:
            mask = masks[layer.window]
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache)
        return self.norm(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(…, D) -> (…, vocab) through the tied embedding, soft-capped on Gemma 2."""
        logits = h @ self.embed_tokens.weight.T
        cap = self.config.final_logit_softcapping if self.config.is_gemma2 else None
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits
