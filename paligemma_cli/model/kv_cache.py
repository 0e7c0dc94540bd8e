"""A preallocated key/value cache for batched incremental decoding.

As in gpt-fast: buffers of the final size are allocated once and written in place at the sequence
slots being filled, so decoding never grows a tensor with `torch.cat`. Next to the keys and values the
cache keeps, per slot, whether it holds a real token (padding does not) and whether that token belongs
to the bidirectional prefix; the attention mask is derived from those.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from paligemma_cli.errors import PaliGemmaError


@dataclass
class KVCache:
    """Keys/values for every decoder layer plus the per-slot facts the mask needs.

    k[i], v[i]: (B, n_kv_heads, max_len, head_dim) for layer i.
    valid:      (B, max_len) bool, slot holds a real (non-padding) token.
    prefix:     (B, max_len) bool, slot is in the image+prefix block (token_type 0).
    next_pos:   (B,) long, the RoPE position the next token of each row gets.
    length:     slots filled so far (same for every row: padding keeps rows aligned).
    pos_bound:  a host-side upper bound on `next_pos` (RoPE tables are sized from it without a sync).

    Going back to an earlier state (`snapshot` / `restore`, e.g. to ask another question about the same
    image prefix) only resets `length`, the slot flags past it and `next_pos`: the keys and values are
    neither copied nor cleared, since slots past `length` are masked out and overwritten when reused.
    """

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    valid: torch.Tensor
    prefix: torch.Tensor
    next_pos: torch.Tensor
    length: int = 0
    pos_bound: int = 1

    @classmethod
    def allocate(cls, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str) -> "KVCache":
        shape = (batch, n_kv_heads, max_len, head_dim)
        return cls(
            k=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)],
            v=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)],
            valid=torch.zeros(batch, max_len, dtype=torch.bool, device=device),
            prefix=torch.zeros(batch, max_len, dtype=torch.bool, device=device),
            next_pos=torch.ones(batch, dtype=torch.long, device=device),
        )

    @property
    def max_len(self) -> int:
        return self.valid.shape[1]

    def claim(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
              attention_mask: torch.Tensor | None = None) -> tuple[int, int, torch.Tensor]:
        """Mark slots [start, end) for (B, T) new tokens (real/padding, prefix/suffix), advance the rows'
        next RoPE positions, and return (start, end, positions (B, T)). `length` is left to the caller,
        to move once the tokens' keys and values are in. `token_type_ids=None`: all suffix (type 1)."""
        T = input_ids.shape[1]
        start, end = self.length, self.length + T
        if end > self.max_len:
            raise PaliGemmaError(f"sequence of {end} tokens exceeds the cache ({self.max_len})")
        if attention_mask is None:  # every new slot holds a real token: the common case, kept cheap
            self.valid[:, start:end] = True
            prefix = token_type_ids == 0 if token_type_ids is not None else None
            positions = self.next_pos[:, None] + torch.arange(T, device=input_ids.device)
            self.next_pos += T
        else:
            real = attention_mask.bool()
            self.valid[:, start:end] = real
            prefix = (token_type_ids == 0) & real if token_type_ids is not None else None
            counts = real.long().cumsum(-1)
            positions = (self.next_pos[:, None] + counts - 1).masked_fill(~real, 1)
            self.next_pos += counts[:, -1]
        self.pos_bound += T  # next_pos grew by at most T
        if prefix is None:  # generated tokens belong to the causal suffix
            self.prefix[:, start:end] = False
        else:
            self.prefix[:, start:end] = prefix
        return start, end, positions

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, n_kv, T, hd) at slots [length, length+T); return the filled part of the cache."""
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def truncate(self, length: int) -> None:
        """Forget every slot from `length` on (flags only; `restore` also resets the next positions)."""
        self.valid[:, length:] = False
        self.prefix[:, length:] = False
        self.length = length

    def resized(self, max_len: int, snap: tuple[int, torch.Tensor, int]) -> "KVCache":
        """A cache of `max_len` slots holding this one's state as of `snap`, e.g. to fit a longer prompt."""
        length, next_pos, pos_bound = snap
        k0 = self.k[0]
        new = KVCache.allocate(len(self.k), k0.shape[0], k0.shape[1], k0.shape[3], max_len, k0.dtype, k0.device)
        for layer in range(len(self.k)):
            new.k[layer][:, :, :length] = self.k[layer][:, :, :length]
            new.v[layer][:, :, :length] = self.v[layer][:, :, :length]
        new.valid[:, :length] = self.valid[:, :length]
        new.prefix[:, :length] = self.prefix[:, :length]
        new.length, new.pos_bound = length, pos_bound
        new.next_pos.copy_(next_pos)
        return new

    def snapshot(self) -> tuple[int, torch.Tensor, int]:
        """The state to come back to: the length and next positions only (no keys or values are copied)."""
        return self.length, self.next_pos.clone(), self.pos_bound

    def restore(self, snap: tuple[int, torch.Tensor, int]) -> None:
        """Go back to `snap`: O(slots past it) flag updates, however long the cached prefix is."""
        length, next_pos, pos_bound = snap
        self.truncate(length)
        self.next_pos.copy_(next_pos)
        self.pos_bound = pos_bound
