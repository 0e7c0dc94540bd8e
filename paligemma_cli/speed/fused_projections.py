"""Linears that read the same input, merged into one for inference: a decoder layer's q|k|v and gate|up.

On a small model a matmul call costs more than its arithmetic (oneDNN's per-call work, and Python's in
eager mode), so one call three times as wide beats three calls: with the demo model's follow-up question
in `paligemma chat --compile`, 28 matmuls became 16 and the question's time to first token fell 10 %
(bench/chat_ttft.py). The fused weight is the separate weights stacked along the output dimension, so
every output is the same dot product as before. The separate modules are dropped rather than kept beside
the fused one (no second copy of the weights); the model is then for inference only, as a packed one is:
`PaliGemma.use_fast_cpu_layout` fuses only projections it then packs (`core/packed_linear.py`), and a
packed model refuses to be saved.
"""

from __future__ import annotations

import torch
from torch import nn


def fuse_linears(block: nn.Module, names: tuple[str, ...], fused_name: str) -> list[torch.Tensor]:
    """Replace `block`'s linears `names` by one, `block.<fused_name>`, whose output is theirs side by side in
    that order; return the replaced weights (e.g. to give their memory back)."""
    linears = [getattr(block, name) for name in names]
    weight = torch.cat([linear.weight.detach() for linear in linears])
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=linears[0].bias is not None, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if fused.bias is not None:
        fused.bias = nn.Parameter(torch.cat([linear.bias.detach() for linear in linears]), requires_grad=False)
    for name in names:
        delattr(block, name)
    setattr(block, fused_name, fused)
    return [linear.weight for linear in linears]
