"""Weight-only int8 for the decoder: every Linear and the tied embedding / output head.

References: gpt-fast `quantize.py` (`WeightOnlyInt8Linear`: an int8 weight with one scale per output
channel, swapped in for `nn.Linear`); `torch.ops.aten._weight_int8pack_mm`, its CPU kernel.

Each weight row (one output channel) is stored as int8 `q` and one scale `s`, symmetric:
`s = max|w_row| / 127`, `q = round(w / s)`, so `|w - q*s| <= s/2` for every element. Activations stay in
the model's dtype; only the weights shrink, to a quarter of float32 or half of bfloat16.

The vision tower, projector and norms stay in floating point: the tower is a fifth of PaliGemma 3B's
weights and runs once per image, while decoding reads the whole decoder once per token. The embedding
table is tied to the output head; it is kept once, in int8, and serves both: the head is an int8 matmul,
and a lookup dequantizes just the rows it reads. That is the smallest choice: a float copy kept for the
lookup would cost 2 more bytes per entry (1 GB for PaliGemma 3B's 257216 x 2048 bf16 table).

Quantizing is a swap of modules, as in gpt-fast: `QuantizedLinear` for each decoder `nn.Linear` and
`QuantizedEmbedding` for the tied table, whose `forward` (lookup) and `attend` (output head) the decoder
calls as it calls the float table's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from paligemma_cli.errors import PaliGemmaError
from paligemma_cli.model.paligemma import PaliGemma

METHOD = "int8-weight-only"
CHOICES = ("none", "int8")
CHUNK_ELEMENTS = 1 << 22  # quantize this many weights at a time: a 16 MB float32 detour, never a whole table


def parse_quantize(name: str | None) -> str | None:
    """'int8' -> 'int8'; 'none' or None -> None; anything else is a one-line error."""
    value = (name or "none").lower()
    if value not in CHOICES:
        raise PaliGemmaError(f"unknown --quantize {name!r}: use none or int8")
    return None if value == "none" else value


def marker(scales_dtype: torch.dtype) -> dict:
    """What `config.json` says about a quantized checkpoint (key "quantization")."""
    return {"method": METHOD, "bits": 8, "symmetric": True, "granularity": "per-output-channel",
            "modules": ["language_model.layers.*.{self_attn,mlp}.*_proj", "language_model.embed_tokens"],
            "scales_dtype": str(scales_dtype).removeprefix("torch.")}


# --- the arithmetic -----------------------------------------------------------------------------------------


@torch.no_grad()
def quantize_per_channel(w: torch.Tensor, scales_dtype: torch.dtype | None = None, out=None):
    """(N, K) float weight -> int8 `q` (N, K) and `scales` (N,) in `scales_dtype` (default: w's dtype).

    The scale is rounded to `scales_dtype` before `q` is computed, so that `q * scales` is the closest
    int8 grid to `w` that the stored scales can express. Rows are independent: quantizing a tensor whole
    or in pieces gives the same result. `out=(q, scales)` writes into given tensors instead.

    The arithmetic runs in float32 on one scratch block of a few MB, in place, whatever the size of `w`:
    no float32 copy of a whole table, and no train of large temporaries to fragment the heap.
    """
    if w.dim() != 2 or not w.is_floating_point():
        raise PaliGemmaError(f"can only quantize a 2-D float weight, got {tuple(w.shape)} {w.dtype}")
    scales_dtype = scales_dtype or w.dtype
    n, k = w.shape
    q, scales = out if out is not None else (torch.empty(n, k, dtype=torch.int8, device=w.device),
                                             torch.empty(n, dtype=scales_dtype, device=w.device))
    step = max(1, CHUNK_ELEMENTS // max(k, 1))
    scratch = torch.empty(min(step, n), k, dtype=torch.float32, device=w.device)
    for i in range(0, n, step):
        block = scratch[: min(step, n - i)].copy_(w[i:i + step])
        s = (torch.linalg.vector_norm(block, float("inf"), dim=1) / 127).to(scales_dtype)  # max |w| / 127
        s = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero row: q = 0 whatever the scale
        q[i:i + len(block)] = block.div_(s.float()[:, None]).round_().clamp_(-127, 127)  # exact integers
        scales[i:i + len(block)] = s
    return q, scales


# From this many rows on (a prompt's prefill, not decoding), converting the weight to bf16 and calling the
# bf16 matmul beats the int8 kernel, whose cost grows with the rows (docs/speed.md).
INT8_DEQUANTIZE_FROM_ROWS = 64


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """`x @ (weight * scales[:, None]).T`: x (..., K) in a float dtype, weight (N, K) int8, scales (N,).

    On CPU in bfloat16 this is `torch.ops.aten._weight_int8pack_mm`, which reads the int8 weight as it
    multiplies. What its bf16 kernel needs (torch 2.13, found by trying; it checks none of the alignment):
    x 2-D with a contiguous last dim, scales 1-D (N,) in x's dtype, weight contiguous, K a multiple of 16
    (otherwise it crashes or silently drops the tail of K), the weight 16-byte aligned and x 32-byte
    aligned (otherwise it crashes). Fresh tensors are 64-byte aligned; `load_model` realigns int8 weights
    read from a file. Its float32 and float16 CPU kernels are many times slower than a float matmul, so
    float32 activations are rounded to bf16 for it (on CPUs with and without native bf16 alike: the
    kernel's bf16 path reads the int8 weight at memory speed either way). Its CUDA kernel is, in torch's
    sources, a float32-only loop; so every other case converts the weight to x's dtype and calls the
    ordinary matmul. So does a prefill of `INT8_DEQUANTIZE_FROM_ROWS` rows or more, where the float matmul
    is the faster of the two.
    """
    out_features, in_features = weight.shape
    rows = x.numel() // in_features
    # Inside `torch.compile` the pointer checks would break the graph; inductor's buffers are 64-byte
    # aligned and rows of K % 16 == 0 bf16 values keep 32-byte alignment. (The dequantize-then-matmul
    # fallback below would be worse there: inductor materialises a bf16 copy of every weight per step.)
    compiling = torch.compiler.is_compiling()
    if (x.device.type == "cpu" and x.dtype == torch.float32 and in_features % 16 == 0 and not compiling
            and rows < INT8_DEQUANTIZE_FROM_ROWS and weight.is_contiguous() and weight.data_ptr() % 64 == 0):
        x2 = x.reshape(-1, in_features).to(torch.bfloat16)  # a fresh tensor: contiguous and aligned
        y = torch.ops.aten._weight_int8pack_mm(x2, weight, scales.to(torch.bfloat16))
        return y.view(*x.shape[:-1], out_features).float()
    if (x.device.type == "cpu" and x.dtype == torch.bfloat16 and in_features % 16 == 0
            and (compiling or (rows < INT8_DEQUANTIZE_FROM_ROWS and weight.is_contiguous()
                               and weight.data_ptr() % 64 == 0))):
        x2 = x.reshape(-1, in_features)
        if compiling:
            x2 = x2.contiguous()
        elif not x2.is_contiguous() or x2.data_ptr() % 64:
            x2 = x2.clone(memory_format=torch.contiguous_format)  # a fresh, aligned copy
        y = torch.ops.aten._weight_int8pack_mm(x2, weight, scales.to(x.dtype))
        return y.view(*x.shape[:-1], out_features)
    if x.dtype == torch.float16:
        # Unscaled sums reach 127/scale times the real output, past float16's range: scale the weight first.
        return F.linear(x, weight.to(x.dtype) * scales.to(x.dtype)[:, None])
    return F.linear(x, weight.to(x.dtype)) * scales.to(x.dtype)  # int8 -> float is exact; one rounding fewer


# --- the modules ---------------------------------------------------------------------------------------------


class QuantizedLinear(nn.Module):
    """A bias-free `nn.Linear` with an int8 `weight` (out, in) and float `scales` (out,), both buffers."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))

    @classmethod
    def from_float(cls, linear: nn.Linear) -> "QuantizedLinear":
        if linear.bias is not None:
            raise PaliGemmaError("QuantizedLinear has no bias; the decoder's linears have none")
        w = linear.weight
        module = cls(linear.in_features, linear.out_features, dtype=w.dtype, device=w.device)
        module.weight, module.scales = quantize_per_channel(w)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight, self.scales)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 x {self.scales.dtype}"


class QuantizedEmbedding(nn.Module):
    """The tied table in int8, one scale per row: a lookup (`forward`) and the output head (`attend`)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer("weight", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(num_embeddings, dtype=dtype, device=device))

    @classmethod
    def from_float(cls, embedding: nn.Embedding) -> "QuantizedEmbedding":
        w = embedding.weight
        module = cls(embedding.num_embeddings, embedding.embedding_dim, dtype=w.dtype, device=w.device)
        module.weight, module.scales = quantize_per_channel(w)
        return module

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype (the scales'), not the int8 of the table."""
        return self.scales.dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(…) ids -> (…, D) rows, dequantized: only the rows looked up are ever made float."""
        return F.embedding(ids, self.weight).to(self.dtype) * self.scales[ids].unsqueeze(-1)

    def attend(self, h: torch.Tensor) -> torch.Tensor:
        """(…, D) -> (…, vocab): the tied output head."""
        return int8_linear(h, self.weight, self.scales)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 x {self.scales.dtype}"


def is_quantized(model: PaliGemma) -> bool:
    return any(isinstance(m, QuantizedEmbedding) for m in model.language_model.embed_tokens.modules())


@torch.no_grad()
def quantize_model(model: PaliGemma) -> PaliGemma:
    """Swap, in place, every `nn.Linear` of the decoder for a `QuantizedLinear` and the tied embedding for
    a `QuantizedEmbedding`; return the model. One module at a time, so the float weights of a module are
    freed as soon as its int8 copy exists. On the `meta` device it builds the empty int8 skeleton that a
    quantized checkpoint loads into. A model already quantized is returned as it is.
    """
    if not isinstance(model, PaliGemma):
        raise PaliGemmaError(f"quantize_model expects a PaliGemma, got {type(model).__name__}")
    if is_quantized(model):
        return model
    decoder = model.language_model
    linears = [name for name, m in decoder.named_modules() if isinstance(m, nn.Linear)]
    for name in linears:
        parent_name, _, attr = name.rpartition(".")
        parent = decoder.get_submodule(parent_name)
        setattr(parent, attr, QuantizedLinear.from_float(getattr(parent, attr)))
    decoder.embed_tokens = QuantizedEmbedding.from_float(decoder.embed_tokens)
    return model
