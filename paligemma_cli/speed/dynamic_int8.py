"""int8 weights times int8 activations for float32 models: fbgemm's dynamic quantized linear.

A float32 model's activations cannot feed the fast int8 weight-only kernel directly (its float32 path
is many times slower than a float matmul). fbgemm's dynamic linear quantizes each call's activations to
8 bits on the fly and multiplies int8 by int8 with AVX2 or AVX-512 instructions, reading a quarter of the
float32 weight's bytes. It trades accuracy for that: the activations lose precision, where weight-only
int8 keeps them (docs/speed.md has the measured effect on answers). Applied to a quantized model as a
module swap, for inference only: the packed weight is fbgemm's own copy, and the int8 tensors it was
packed from are dropped, so a swapped model is not saved.

Reference: PyTorch's `torch.ao.nn.quantized.dynamic.Linear`, which calls the same two operators.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import nn

from paligemma_cli.machine import cpu_flags
from paligemma_cli.speed.mapped_pages import release_mapped_pages, safetensors_mappings
from paligemma_cli.speed.quantize import QuantizedEmbedding, QuantizedLinear


def available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


def _pack(weight: torch.Tensor, scales: torch.Tensor):
    """fbgemm's packed form of an int8 (N, K) weight with one float scale per row."""
    n = weight.shape[0]
    with warnings.catch_warnings():  # the quantized-tensor API warns of its future; torch 2.13 has it
        warnings.simplefilter("ignore", UserWarning)
        q = torch._make_per_channel_quantized_tensor(weight, scales.double(), torch.zeros(n, dtype=torch.long), 0)
    return torch.ops.quantized.linear_prepack(q, None)


class DynamicInt8Linear(nn.Module):
    """`QuantizedLinear` computed by fbgemm with activations quantized per call (float32 in and out)."""

    inference_only = True  # the packed weight cannot be saved

    def __init__(self, linear: QuantizedLinear, reduce_range: bool):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = _pack(linear.weight, linear.scales)
        # Without VNNI, fbgemm's AVX2 and AVX-512 kernels add pairs of u8*s8 products in 16 bits, which can
        # saturate: 7-bit activations (`reduce_range`) keep the sums in range.
        self.reduce_range = reduce_range

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.quantized.linear_dynamic(x.reshape(-1, self.in_features), self.packed, self.reduce_range)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 x dynamic int8 (fbgemm)"


class DynamicInt8Head(nn.Module):
    """The tied int8 table: lookups as `QuantizedEmbedding` does them, the output head through fbgemm."""

    inference_only = True

    def __init__(self, table: QuantizedEmbedding, reduce_range: bool):
        super().__init__()
        self.table = table
        self.packed = _pack(table.weight, table.scales)
        self.reduce_range = reduce_range

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table(ids)

    def attend(self, h: torch.Tensor) -> torch.Tensor:
        y = torch.ops.quantized.linear_dynamic(h.reshape(-1, h.shape[-1]), self.packed, self.reduce_range)
        return y.view(*h.shape[:-1], -1)


def has_vnni() -> bool:
    """AVX-512 VNNI or AVX-VNNI: int8 dot products without the 16-bit intermediate sums (unless fbgemm is
    held to older instructions with `FBGEMM_ENABLE_INSTRUCTIONS`, as a test of another CPU class does)."""
    forced = os.environ.get("FBGEMM_ENABLE_INSTRUCTIONS", "").upper()
    if forced and "VNNI" not in forced and not forced.endswith("_E1"):
        return False
    return bool(cpu_flags(("avx512_vnni", "avx_vnni")))


def use_dynamic_int8(model) -> None:
    """Swap, in place, the int8 decoder linears (and the output head) of a float32 quantized model for
    fbgemm's dynamic int8 versions; the replaced int8 weights' file pages are given back."""
    reduce_range = not has_vnni()
    mappings = safetensors_mappings()
    decoder = model.language_model
    for parent in list(decoder.modules()):
        for name, module in list(parent.named_children()):
            if type(module) is QuantizedLinear:
                setattr(parent, name, DynamicInt8Linear(module, reduce_range))
                release_mapped_pages(module.weight, mappings)
    if type(decoder.embed_tokens) is QuantizedEmbedding:
        decoder.embed_tokens = DynamicInt8Head(decoder.embed_tokens, reduce_range)
