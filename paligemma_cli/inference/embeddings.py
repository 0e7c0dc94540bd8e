"""A SigLIP dual encoder's embeddings, and zero-shot label probabilities from them.

Reference: `transformers`' zero-shot image classification with `SiglipModel`, where each label's
probability is `sigmoid(logits_per_image)` on its own (labels need not sum to 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from paligemma_cli.model.siglip import DualEncoder
from paligemma_cli.processing.siglip_tokenizer import SiglipTokenizer


@torch.no_grad()
def embed_images(model: DualEncoder, pixel_values: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return model.encode_image(pixel_values.to(device)).float().cpu()


@torch.no_grad()
def embed_texts(model: DualEncoder, tokenizer: SiglipTokenizer, texts: Sequence[str]) -> torch.Tensor:
    device = next(model.parameters()).device
    return model.encode_text(tokenizer(texts).to(device)).float().cpu()


@torch.no_grad()
def label_probabilities(model: DualEncoder, tokenizer: SiglipTokenizer, pixel_values: torch.Tensor, labels: Sequence[str]) -> torch.Tensor:
    """(B, 3, S, S) images and L label texts -> (B, L) independent probabilities `sigmoid(logits_per_image)`."""
    device = next(model.parameters()).device
    logits_per_image, _ = model(pixel_values.to(device), tokenizer(labels).to(device))
    return torch.sigmoid(logits_per_image.float()).cpu()
