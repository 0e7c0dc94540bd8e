"""A decoder layer's q|k|v and gate|up projections, each merged into one linear (inference only).

On a small model a matmul call costs more than its arithmetic (oneDNN's per-call work, and Python's in
eager mode), so one call three times as wide beats three calls (bench/results/chat-ttft-fused.out). The
fused weight is the separate weights stacked along the output dimension, so every output is the same
dot product as before. The modules are swapped whole (`FusedGemmaAttention` for a `GemmaAttention`,
`FusedGemmaMLP` for a `GemmaMLP`); the separate linears are dropped rather than kept beside the fused one,
so no second copy of the weights exists, and the model is then for inference only, as a packed one is.
"""

from __future__ import annotations

import torch
from torch import nn

from paligemma_cli.model.gemma import GemmaAttention, GemmaMLP
from paligemma_cli.model.skeleton import empty_skeleton


def stack_linears(linears: list[nn.Linear]) -> nn.Linear:
    """One linear whose output is the given linears' outputs side by side, in order."""
    weight = torch.cat([linear.weight.detach() for linear in linears])
    with empty_skeleton():
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias=linears[0].bias is not None)
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if fused.bias is not None:
        fused.bias = nn.Parameter(torch.cat([linear.bias.detach() for linear in linears]), requires_grad=False)
    return fused


class FusedGemmaAttention(GemmaAttention):
    """`GemmaAttention` with q|k|v computed by one linear, `qkv_proj`."""

    def __init__(self, attn: GemmaAttention):
        with empty_skeleton():  # the three separate projections are never materialised
            super().__init__(attn.config, attn.layer_idx)
        del self.q_proj, self.k_proj, self.v_proj
        self.o_proj = attn.o_proj
        self.qkv_proj = stack_linears([attn.q_proj, attn.k_proj, attn.v_proj])

    def project(self, x: torch.Tensor, last_only: bool = False):
        H, KV, hd = self.n_heads, self.n_kv, self.head_dim
        q, k, v = self.qkv_proj(x).split((H * hd, KV * hd, KV * hd), dim=-1)
        return (q[:, -1:] if last_only else q), k, v


class FusedGemmaMLP(GemmaMLP):
    """`GemmaMLP` with gate|up computed by one linear, `gate_up_proj`."""

    def __init__(self, mlp: GemmaMLP):
        with empty_skeleton():
            super().__init__(mlp.config)
        del self.gate_proj, self.up_proj
        self.down_proj = mlp.down_proj
        self.gate_up_proj = stack_linears([mlp.gate_proj, mlp.up_proj])

    def gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return gate, up
