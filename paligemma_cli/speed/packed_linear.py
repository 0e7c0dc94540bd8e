"""An inference-only `nn.Linear` whose bfloat16 weight sits in oneDNN's blocked layout on the CPU.

Decoding reads every weight once per token, so its speed is the matrix-vector product's streaming
rate, and oneDNN's kernel streams a pre-packed weight faster than PyTorch's stock bf16 `F.linear` reads a
row-major one (docs/speed.md). Both accumulate in float32 and give bit-identical outputs.
This is the layout `torch.compile` (inductor, with freezing) gives bf16 linears on the CPU.

The packed tensor has the weight's size but not its meaning element by element, so a packed model
cannot be trained or saved: `cpu_layout.use_fast_cpu_layout` packs, and only inference paths call it.
"""

from __future__ import annotations

import torch
from torch import nn


def can_pack(weight: torch.Tensor) -> bool:
    """oneDNN serves bf16 matmuls on this CPU and `weight` is a bf16 CPU weight."""
    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16
            and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class PackedLinear(nn.Module):
    """`y = x @ W.T + b` with W pre-packed for oneDNN (the batch-size hint 1 suits decoding best and
    is no slower than the stock layout for prefill)."""

    inference_only = True  # the packed layout is meaningless in a checkpoint

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # Not persistent: the blocked layout is meaningless in a checkpoint (see `save_model`).
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1),
                             persistent=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return packed_linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bf16 oneDNN-packed"


# Inductor's own lowering of `mkldnn._linear_pointwise` expects weights it packed itself (frozen graph
# constants) and fails on ours; as an opaque op the kernel is called as it is in eager mode.
@torch.library.custom_op("paligemma::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@packed_linear.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def is_packed(model: nn.Module) -> bool:
    return any(isinstance(m, PackedLinear) for m in model.modules())
