"""Contrastive image-text losses: CLIP's softmax loss and SigLIP's sigmoid loss (direct and chunked).

References: Radford et al., "Learning Transferable Visual Models From Natural Language Supervision"
(CLIP, 2021); Zhai et al., "Sigmoid Loss for Language Image Pre-Training" (SigLIP, 2023);
big_vision's `trainers/proj/image_text/siglip.py`; `transformers`' `SiglipModel` (`return_loss=True`).

Every loss takes raw (unnormalised) embeddings, img_emb[i] paired with txt_emb[i], and L2-normalises
them itself, so it sees the cosine-similarity matrix. txt_emb may have more rows than img_emb: rows past
the batch are hard negatives, texts that match no image of the batch (Yuksekgonul et al., "When and why
vision-language models behave like bags-of-words", 2023: NegCLIP's word-order negatives). The temperature is log-parametrised: the model
learns `logit_scale` and the logits are multiplied by `exp(logit_scale)`, which keeps it positive.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# Initial values of the learned temperature (log-scale) and bias, from the two papers.
CLIP_INIT_LOGIT_SCALE = math.log(1 / 0.07)
CLIP_MAX_SCALE = 100.0  # CLIP caps exp(logit_scale) so training cannot sharpen the softmax without bound


def _as_tensor(x: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    # Accept a Python float for convenience; a tensor (e.g. an nn.Parameter of shape [1]) keeps its graph.
    return x if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=like.dtype, device=like.device)


def _check_pairs(img_emb: torch.Tensor, txt_emb: torch.Tensor) -> int:
    """The batch size B; every image needs its text, so txt_emb has B rows plus any hard negatives."""
    if txt_emb.shape[0] < img_emb.shape[0]:
        raise ValueError(f"{img_emb.shape[0]} images but {txt_emb.shape[0]} texts: text i must pair with image i")
    return img_emb.shape[0]


def cosine_similarity_matrix(img_emb: torch.Tensor, txt_emb: torch.Tensor) -> torch.Tensor:
    """(B, D), (B', D) -> (B, B') with entry [i, j] = cos(img_i, txt_j)."""
    return F.normalize(img_emb, dim=-1) @ F.normalize(txt_emb, dim=-1).T


def clip_loss(img_emb: torch.Tensor, txt_emb: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric softmax cross-entropy: each image must pick its own text among the batch, and vice versa.

    Args:
        img_emb: (B, D) image embeddings; row i is paired with txt_emb[i].
        txt_emb: (B + M, D) text embeddings; the M >= 0 rows past B are hard negatives, extra wrong
            choices for every image (they are not queries: text->image runs over the B paired texts).
        logit_scale: log of the inverse temperature (scalar or shape [1]); exp is clamped at 100.

    Returns:
        Scalar mean of the image->text and text->image cross-entropies (nats).
    """
    b = _check_pairs(img_emb, txt_emb)
    scale = _as_tensor(logit_scale, img_emb).exp().clamp(max=CLIP_MAX_SCALE)
    logits = cosine_similarity_matrix(img_emb, txt_emb) * scale  # (B, B + M), rows = images
    targets = torch.arange(b, device=logits.device)  # the pair is on the diagonal
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits[:, :b].T, targets)) / 2


def siglip_loss(img_emb: torch.Tensor, txt_emb: torch.Tensor, logit_scale: torch.Tensor | float,
                logit_bias: torch.Tensor | float) -> torch.Tensor:
    """Sigmoid loss: every (image, text) pair is an independent binary "do they match?" decision.

    `logits = cos_sim * exp(logit_scale) + logit_bias`, `z = 2I - 1` (+1 on the diagonal, -1 elsewhere),
    `loss = -sum(logsigmoid(z * logits)) / B`: summed over all B² pairs, divided by the batch size
    (not B²), as in the paper and big_vision. Hard negatives add B x M pairs, all with z = -1.

    Args:
        img_emb: (B, D); txt_emb: (B + M, D), rows past B hard negatives; logit_scale, logit_bias:
            scalars or shape [1].

    Returns:
        Scalar loss. Materialises the (B, B + M) matrix; see `siglip_loss_chunked` for large batches.
    """
    b = _check_pairs(img_emb, txt_emb)
    scale, bias = _as_tensor(logit_scale, img_emb).exp(), _as_tensor(logit_bias, img_emb)
    logits = cosine_similarity_matrix(img_emb, txt_emb) * scale + bias  # (B, B + M)
    z = 2 * torch.eye(b, logits.shape[1], dtype=logits.dtype, device=logits.device) - 1
    return -F.logsigmoid(z * logits).sum() / logits.shape[0]


def _siglip_block(img_n: torch.Tensor, txt_blk: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                  start: int) -> torch.Tensor:
    """-sum(logsigmoid(z * logits)) over columns start..start+c of the similarity matrix."""
    logits = img_n @ txt_blk.T * scale + bias  # (B, c)
    rows = torch.arange(img_n.shape[0], device=logits.device)[:, None]
    cols = torch.arange(start, start + txt_blk.shape[0], device=logits.device)[None, :]
    z = 2 * (rows == cols).to(logits.dtype) - 1  # positives are where row index == global column index
    return -F.logsigmoid(z * logits).sum()


def siglip_loss_chunked(img_emb: torch.Tensor, txt_emb: torch.Tensor, logit_scale: torch.Tensor | float,
                        logit_bias: torch.Tensor | float, chunk_size: int) -> torch.Tensor:
    """`siglip_loss` computed over blocks of `chunk_size` texts, in O(B * chunk_size) memory.

    The sigmoid loss is a plain sum over pairs, so it splits over column blocks exactly (this is
    big_vision's multi-device trick, done sequentially). Each block runs under activation
    checkpointing: backward recomputes the block's (B, c) logits instead of keeping all of them,
    so neither pass ever holds the whole (B, B) matrix. Value and gradients equal `siglip_loss`
    up to float rounding.

    Args:
        img_emb: (B, D); txt_emb: (B + M, D), rows past B hard negatives; logit_scale, logit_bias:
            scalars or shape [1].
        chunk_size: texts per block (any positive int; the last block may be smaller).
    """
    _check_pairs(img_emb, txt_emb)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    scale, bias = _as_tensor(logit_scale, img_emb).exp(), _as_tensor(logit_bias, img_emb)
    img_n, txt_n = F.normalize(img_emb, dim=-1), F.normalize(txt_emb, dim=-1)  # (B, D) each: O(B*D)
    total = img_n.new_zeros(())
    for start in range(0, txt_n.shape[0], chunk_size):
        txt_blk = txt_n[start:start + chunk_size]  # (c, D)
        if torch.is_grad_enabled():
            total = total + checkpoint(_siglip_block, img_n, txt_blk, scale, bias, start, use_reentrant=False)
        else:
            total = total + _siglip_block(img_n, txt_blk, scale, bias, start)
    return total / img_n.shape[0]
