"""The prefix-LM attention mask, written as predicates over (query, key) and combined.

Key k is visible to query q when k is a real token and either k <= q (causal) or both are in the
image+prefix block: the prefix attends both ways, the suffix is causal and sees the whole prefix.
On Gemma 2's sliding layers the causal part is also limited to the last `window` slots; the prefix
block stays fully visible to itself (as in transformers, where the block overlay is OR-ed on top).
Indices are sequence slots (padding included), not RoPE positions.
"""

from __future__ import annotations

import torch


def prefix_lm_mask(
    q_slots: torch.Tensor,
    q_prefix: torch.Tensor,
    kv_valid: torch.Tensor,
    kv_prefix: torch.Tensor,
    window: int | None = None,
) -> torch.Tensor:
    """Boolean mask (B, 1, T, S), True where attention is allowed.

    q_slots:   (T,) slot index of each query.
    q_prefix:  (B, T) query is in the prefix block.
    kv_valid:  (B, S) key slot holds a real token.
    kv_prefix: (B, S) key slot is in the prefix block.
    """
    k_slots = torch.arange(kv_valid.shape[1], device=kv_valid.device)
    q, k = q_slots[:, None], k_slots[None, :]  # (T, 1), (1, S)
    causal = k <= q
    if window is not None:
        causal = causal & (k > q - window)
    block = q_prefix[:, :, None] & kv_prefix[:, None, :]  # (B, T, S)
    allowed = kv_valid[:, None, :] & (causal | block)
    # A padding query may see nothing; letting it see itself keeps its softmax finite (no NaN to spread).
    allowed = allowed | (k == q)
    return allowed[:, None]
