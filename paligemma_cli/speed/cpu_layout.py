"""Give a loaded model's CPU weights the layout its matmuls are fastest with (inference only).

float32 on AVX-512 CPUs: linear weights are stored column-major, same shapes and values: for the few
rows of a question or a decode step MKL's float32 GEMM is faster with `W.T` contiguous (on AVX2 it is
not, and the weights stay as they are). `save_model` writes contiguous copies, so checkpoints do not
change.

bfloat16 with native oneDNN support: `nn.Linear`s become `PackedLinear`s (oneDNN's blocked layout,
bit-identical outputs), a decoder layer's q|k|v and gate|up first merged where they are small
(`FUSE_MAX_BYTES`, see `fused_projections.py`). A packed model cannot be trained or saved. The tied
output head stays as it is: packing it would need a second copy of the embedding table. GPU weights and
int8 ones are left alone. The figures behind each choice are in docs/speed.md.
"""

from __future__ import annotations

import torch
from torch import nn

from paligemma_cli.model.paligemma import PaliGemma
from paligemma_cli.speed.fused_projections import FusedGemmaAttention, FusedGemmaMLP
from paligemma_cli.speed.kernel_choice import cpu_facts
from paligemma_cli.speed.mapped_pages import release_mapped_pages, safetensors_mappings
from paligemma_cli.speed.packed_linear import PackedLinear, can_pack

# Projections that read the same input are merged when together they hold at most this many bytes: merging
# saves a call's fixed cost, which matters for small matmuls only, and costs a copy while loading.
FUSE_MAX_BYTES = 16 << 20


def use_fast_cpu_layout(model: PaliGemma) -> PaliGemma:
    """Re-lay out `model`'s CPU weights in place (see the module docstring). Idempotent; returns the model."""
    mappings = safetensors_mappings()
    # MKL's AVX2 kernels are no faster on column-major weights, and slower on some shapes: only AVX-512 CPUs
    # get that layout (bench/results/kernels-*).
    column_major = cpu_facts().capability.startswith("AVX512")
    for layer in model.language_model.layers:
        for name, names, fused_type in (("self_attn", ("q_proj", "k_proj", "v_proj"), FusedGemmaAttention),
                                        ("mlp", ("gate_proj", "up_proj"), FusedGemmaMLP)):
            block = getattr(layer, name)
            linears = [getattr(block, n, None) for n in names]
            if (all(type(m) is nn.Linear and can_pack(m.weight) for m in linears)  # not LoRA, int8, fp32, fused
                    and sum(m.weight.nbytes for m in linears) <= FUSE_MAX_BYTES):
                setattr(layer, name, fused_type(block))
                for m in linears:
                    release_mapped_pages(m.weight, mappings)
    for parent in list(model.modules()):
        for name, module in list(parent.named_children()):
            if type(module) is not nn.Linear:
                continue
            w = module.weight
            if can_pack(w):
                setattr(parent, name, PackedLinear(module))
                # The packed copy replaces the weight: its pages in the checkpoint's mapping, read to pack
                # it, would otherwise stay counted in memory beside the copy.
                release_mapped_pages(w, mappings)
            elif w.device.type == "cpu" and w.dtype == torch.float32 and w.is_contiguous() and column_major:
                module.weight.data = w.data.t().contiguous().t()
    return model
