"""Which kernel computes each kind of layer on this machine, chosen once from what the CPU can do.

The CPU classes that matter: AVX2 only (most laptops and desktops), AVX-512 without bf16, and AVX-512
with bf16 (or AMX). Native bf16 is what makes bf16 weights pay (oneDNN's packed layout, the default
dtype); without it a model runs in float32, and int8 weights need a kernel that takes float32
activations. `describe()` says what was chosen (`paligemma env`); the figures behind each choice are in
docs/speed.md and bench/results/kernels-*.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from paligemma_cli.errors import PaliGemmaError
from paligemma_cli.speed import dynamic_int8
from paligemma_cli.speed.packed_linear import can_pack

INT8_KERNEL_ENV = "PALIGEMMA_INT8_KERNEL"
INT8_KERNELS = ("auto", "weight-only", "dynamic")


@dataclass(frozen=True)
class CpuFacts:
    capability: str  # the vector ISA torch's own kernels use: AVX2, AVX512, ...
    native_bf16: bool  # oneDNN computes bf16 natively (AVX512-BF16 or AMX)
    vnni: bool
    fbgemm: bool  # dynamic int8 linears available

    @property
    def cpu_class(self) -> str:
        if self.native_bf16:
            return "AVX-512 with bf16"
        return "AVX-512 without bf16" if self.capability.startswith("AVX512") else self.capability


@functools.cache
def cpu_facts() -> CpuFacts:
    return CpuFacts(capability=torch.backends.cpu.get_cpu_capability(),
                    native_bf16=can_pack(torch.empty(0, dtype=torch.bfloat16)),
                    vnni=dynamic_int8.has_vnni(), fbgemm=dynamic_int8.available())


def int8_kernel(dtype: torch.dtype, device: torch.device) -> str:
    """"weight-only" (int8 weights, activations kept: bf16 natively, float32 through the bf16 kernel) or
    "dynamic" (fbgemm: activations quantized per call), for a quantized model in `dtype` on `device`.
    `$PALIGEMMA_INT8_KERNEL` overrides the automatic choice."""
    wanted = os.environ.get(INT8_KERNEL_ENV, "auto").strip().lower() or "auto"
    if wanted not in INT8_KERNELS:
        raise PaliGemmaError(f"{INT8_KERNEL_ENV} must be one of {', '.join(INT8_KERNELS)}, got {wanted!r}")
    dynamic_possible = device.type == "cpu" and dtype == torch.float32 and cpu_facts().fbgemm
    if wanted == "dynamic" and not dynamic_possible:
        raise PaliGemmaError(f"{INT8_KERNEL_ENV}=dynamic needs float32 on a CPU with fbgemm (--dtype fp32)")
    # Automatically, weight-only everywhere: dynamic int8 is faster on float32 models but quantizing the
    # activations cost one demo model 2 points of detection accuracy (docs/speed.md), so it is opt-in.
    return "weight-only" if wanted == "auto" else wanted


def use_int8_kernels(model) -> str:
    """Give a quantized model the int8 kernel `int8_kernel` chooses; returns its name."""
    kernel = int8_kernel(model.dtype, model.device)
    if kernel == "dynamic":
        dynamic_int8.use_dynamic_int8(model)
    return kernel


def describe(dtype: torch.dtype, device: torch.device, quantized: bool, fast_layout: bool) -> dict[str, str]:
    """Layer type -> the kernel that computes it, in words."""
    facts = cpu_facts()
    if device.type != "cpu":
        linear = "torch's matmul on the GPU" + (" (int8 weights converted per call)" if quantized else "")
        return {"decoder linears": linear, "output head": linear, "vision tower": "torch's matmul on the GPU"}
    if dtype == torch.bfloat16:
        float_linear = ("oneDNN, weights packed once (fast layout)" if fast_layout and facts.native_bf16
                        else "torch's bf16 matmul" + ("" if facts.native_bf16 else " (emulated: slow on this CPU)"))
    elif dtype == torch.float32:
        column_major = fast_layout and facts.capability.startswith("AVX512")
        float_linear = "MKL float32 matmul" + (", weights stored column-major (fast layout)" if column_major else "")
    else:
        float_linear = f"torch's {str(dtype).removeprefix('torch.')} matmul"
    # The tied head is the embedding table itself: re-laying it out would need a second copy of it.
    head = f"the tied embedding table, torch's {str(dtype).removeprefix('torch.')} matmul"
    if not quantized:
        return {"decoder linears": float_linear, "output head": head, "vision tower": float_linear}
    kernel = int8_kernel(dtype, device)
    if kernel == "dynamic":
        int8 = "int8 x int8, activations quantized per call (fbgemm dynamic)"
    elif dtype in (torch.bfloat16, torch.float32):
        int8 = ("int8 weights, bf16 activations (_weight_int8pack_mm)"
                + (", float32 rounded to bf16 for it" if dtype == torch.float32 else "")
                + "; prompts of 64+ rows through the float matmul")
    else:
        int8 = "int8 weights converted per call, then the float matmul"
    return {"decoder linears": int8, "output head": "the tied int8 table, " + int8, "vision tower": float_linear}
