"""Tiny random PaliGemma checkpoints written by `transformers` (the reference), for parity tests.

Sizes are deliberately odd: GQA 4:2, head_dim different from hidden/heads, non-square projections,
and every norm weight and bias perturbed away from its initial value so that a wrong formula shows.
Gemma 2 gets small soft-caps and a short sliding window so that each of them changes the numbers.
"""

from __future__ import annotations

import torch

VOCAB = 320
IMAGE_TOKEN = 300
IMAGE_SIZE = 28
PATCH = 7  # 16 image tokens


def tiny_hf_config(variant: str = "gemma", **text_overrides):
    from transformers import PaliGemmaConfig

    text = dict(
        model_type=variant, hidden_size=40, intermediate_size=56, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=12, vocab_size=VOCAB,
    )
    if variant == "gemma2":
        text.update(query_pre_attn_scalar=20, attn_logit_softcapping=1.5, final_logit_softcapping=2.5,
                    sliding_window=6)
    text.update(text_overrides)
    vision = dict(
        model_type="siglip_vision_model", hidden_size=24, intermediate_size=36, num_hidden_layers=2,
        num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH, vision_use_head=False,
    )
    return PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                           vocab_size=VOCAB, projection_dim=40, hidden_size=40)


def randomize_(model, seed: int = 0) -> None:
    """Give every parameter a scale at which each part of the network matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # norm weights and biases
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) * 2 * fan_in**-0.5)


def make_hf_model(variant: str = "gemma", seed: int = 0, **text_overrides):
    from transformers import PaliGemmaForConditionalGeneration

    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(tiny_hf_config(variant, **text_overrides)).eval()
    randomize_(model, seed)
    return model


def make_inputs(batch_lengths, padding_side: str = "left", suffix_lengths=None, seed: int = 0):
    """A batch of prompts: 16 <image> tokens, <bos>, a random prefix (type 0), an optional suffix (type 1).

    Returns input_ids, attention_mask, token_type_ids, pixel_values, each padded on `padding_side`.
    """
    g = torch.Generator().manual_seed(seed)
    n_img = (IMAGE_SIZE // PATCH) ** 2
    suffix_lengths = suffix_lengths or [0] * len(batch_lengths)
    rows = []
    for n_prefix, n_suffix in zip(batch_lengths, suffix_lengths):
        prefix = torch.randint(4, IMAGE_TOKEN, (n_prefix,), generator=g).tolist()
        suffix = torch.randint(4, IMAGE_TOKEN, (n_suffix,), generator=g).tolist()
        ids = [IMAGE_TOKEN] * n_img + [2] + prefix + suffix
        types = [0] * (n_img + 1 + n_prefix) + [1] * n_suffix
        rows.append((ids, types))
    T = max(len(ids) for ids, _ in rows)
    input_ids = torch.zeros(len(rows), T, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), T, dtype=torch.long)
    token_type_ids = torch.zeros(len(rows), T, dtype=torch.long)
    for i, (ids, types) in enumerate(rows):
        n = len(ids)
        sl = slice(T - n, T) if padding_side == "left" else slice(0, n)
        input_ids[i, sl] = torch.tensor(ids)
        attention_mask[i, sl] = 1
        token_type_ids[i, sl] = torch.tensor(types)
    pixel_values = torch.rand(len(rows), 3, IMAGE_SIZE, IMAGE_SIZE, generator=g) * 2 - 1
    return dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                pixel_values=pixel_values)


def hf_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens from 1, as transformers' generate computes them."""
    return attention_mask.long().cumsum(-1).masked_fill(attention_mask == 0, 1)
