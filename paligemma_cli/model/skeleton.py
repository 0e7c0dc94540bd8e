"""Build a model's skeleton on the `meta` device without running its random initialisation.

The loaders build the model first and fill it from a checkpoint, so the random init is wasted work;
on the `meta` device it is also slow to start: the first `normal_` there has no C++ kernel and imports
torch's Python decompositions, seconds of a fresh process (docs/speed.md). `transformers` skips its init
the same way when loading.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "xavier_uniform_",
                   "xavier_normal_", "kaiming_uniform_", "kaiming_normal_")


def _leave_as_is(tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return tensor


@contextmanager
def empty_skeleton() -> Iterator[None]:
    """Modules created inside have `meta` tensors (no memory) and skip `torch.nn.init`'s fills."""
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS}
    try:
        for name in _INIT_FUNCTIONS:
            setattr(nn.init, name, _leave_as_is)
        with torch.device("meta"):
            yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)
