"""LoRA: low-rank adapters on linear layers, swapped in as modules and merged back on save.

Reference: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2021). `W x + (alpha/r) B A x`
with A small-random and B zero, so training starts exactly at the base model.
"""

from __future__ import annotations

import math

import torch
from torch import nn

DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        self.base = base
        self.base.weight.requires_grad_(False)
        self.r, self.alpha = r, alpha
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=base.weight.dtype, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=base.weight.dtype, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.T @ self.lora_B.T) * self.scale

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            self.base.weight += (self.lora_B @ self.lora_A).to(self.base.weight.dtype) * self.scale
        self.base.weight.requires_grad_(True)
        return self.base


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16, targets=DECODER_LINEARS,
               scope: str = "language_model") -> int:
    """Wrap every `nn.Linear` named in `targets` under `scope` with an adapter; return how many."""
    root = model.get_submodule(scope)
    wrapped = 0
    for name, module in list(root.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name in targets:
                setattr(module, child_name, LoRALinear(child, r, alpha))
                wrapped += 1
    return wrapped


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, leaving a plain model with the original key names."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.merged())
    return model


def merged_state_dict(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The model's weights with every adapter folded in, under the plain (un-adapted) names.

    `state` is the model's `state_dict()` (the default), or a copy of it made elsewhere: gathered whole
    from the shards of several processes. The model itself is left as it is, so training can go on
    after a save.
    """
    state = model.state_dict() if state is None else state
    merged = {}
    for name, t in state.items():
        if ".lora_A" in name or ".lora_B" in name:
            continue
        if ".base." in name:
            owner = name[: name.index(".base.")]
            if name.endswith("weight"):
                scale = model.get_submodule(owner).scale
                t = t + (state[owner + ".lora_B"] @ state[owner + ".lora_A"]).to(t.dtype) * scale
            name = owner + name[name.index(".base.") + len(".base"):]
        merged[name] = t.detach()
    return merged


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter weights, under the names of the layers they adapt."""
    return {k: v for k, v in model.state_dict().items() if "lora_A" in k or "lora_B" in k}


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    missing = set(lora_state_dict(model)) - set(state)
    if missing:
        raise KeyError(f"adapter is missing {sorted(missing)[:3]}")
    model.load_state_dict(state, strict=False)
