"""Choosing the device and dtype a model runs in."""

from __future__ import annotations

import torch

from paligemma_cli.errors import PaliGemmaError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def pick_device(name: str = "auto") -> torch.device:
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PaliGemmaError("--device cuda was asked for, but this machine has no usable CUDA GPU; use --device cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise PaliGemmaError("--device mps was asked for, but MPS is not available here; use --device cpu")
    if name != "cpu" and not name.startswith(("cuda", "mps")):
        raise PaliGemmaError(f"unknown --device {name!r}: use auto, cpu, cuda or mps")
    return torch.device(name)


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        # Native bf16 (AVX512-BF16 or AMX) makes it a win; emulated bf16 is slower than float32.
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return device.type == "mps"


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    name = (name or "auto").lower()
    if name == "auto":
        return torch.bfloat16 if bf16_supported(device) else torch.float32
    if name not in DTYPES:
        raise PaliGemmaError(f"unknown --dtype {name!r}: use auto, fp32, bf16 or fp16")
    return DTYPES[name]
