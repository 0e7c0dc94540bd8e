"""PaliGemma: SigLIP vision tower -> linear projector -> Gemma decoder with a prefix-LM mask.

References: Beyer et al., "PaliGemma: A versatile 3B VLM for transfer" (2024); Steiner et al.,
"PaliGemma 2" (2024); big_vision's `paligemma` model; `transformers.models.paligemma`.

The projected image features replace the `<image>` placeholder embeddings in order; text embeddings
are scaled by sqrt(hidden), image features are not. RoPE positions count real tokens from 1.
"""

from __future__ import annotations

import torch
from torch import nn

from paligemma_cli.errors import PaliGemmaError
from paligemma_cli.model.config import PaliGemmaConfig
from paligemma_cli.model.gemma import GemmaDecoder
from paligemma_cli.model.kv_cache import KVCache
from paligemma_cli.model.mask import prefix_lm_mask
from paligemma_cli.model.siglip import SiglipVisionTower


class MultiModalProjector(nn.Module):
    def __init__(self, cfg: PaliGemmaConfig):
        super().__init__()
        self.linear = nn.Linear(cfg.vision.hidden_size, cfg.text.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class PaliGemma(nn.Module):
    def __init__(self, cfg: PaliGemmaConfig):
        super().__init__()
        self.config = cfg
        self.vision_tower = SiglipVisionTower(cfg.vision)
        self.multi_modal_projector = MultiModalProjector(cfg)
        self.language_model = GemmaDecoder(cfg.text)

    # Read off the final norm: a float weight that no int8 or packed-layout swap ever replaces.
    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.language_model.norm.weight.device

    # --- building blocks ---------------------------------------------------------------------

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, N, D_text)."""
        return self.multi_modal_projector(self.vision_tower(pixel_values.to(self.dtype)))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              image_features: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids -> (B, T, D) embeddings with image features in the `<image>` slots.

        `image_features` (B, N, D), as `image_features()` returned them earlier (a server that caches
        them per image), stand in for `pixel_values`.
        """
        has_images = pixel_values is not None or image_features is not None
        if not has_images and self.config.image_token_id < self.config.text.vocab_size:
            return self.language_model.embed(input_ids)  # text only (a question, a decode step)
        is_image = input_ids == self.config.image_token_id
        if self.config.image_token_id >= self.config.text.vocab_size:
            # Small checkpoints may put <image> past the embedding table; its row is replaced anyway.
            input_ids = input_ids.masked_fill(is_image, 0)
        x = self.language_model.embed(input_ids)
        if not has_images:
            return x
        if image_features is None:
            image_features = self.image_features(pixel_values)
        feats = image_features.to(x.dtype)  # (B, N, D)
        if int(is_image.sum()) != feats.shape[0] * feats.shape[1]:
            raise PaliGemmaError(
                f"the prompt has {int(is_image.sum())} <image> tokens but the images give "
                f"{feats.shape[0] * feats.shape[1]} features"
            )
        return x.masked_scatter(is_image[..., None], feats)

    def attention_masks(self, q_slots, q_prefix, kv_valid, kv_prefix) -> dict:
        """One prefix-LM mask per distinct sliding window of the decoder's layers (see `mask.py`)."""
        windows = {layer.window for layer in self.language_model.layers}
        return {w: prefix_lm_mask(q_slots, q_prefix, kv_valid, kv_prefix, w) for w in windows}

    # --- full forward (training, scoring) ---------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                ) -> torch.Tensor:
        """Logits (B, T, vocab) for every position, with no cache."""
        h = self.hidden_states(input_ids, pixel_values, token_type_ids, attention_mask)
        return self.language_model.logits(h)

    def hidden_states(self, input_ids, pixel_values=None, token_type_ids=None, attention_mask=None) -> torch.Tensor:
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        real = attention_mask.bool()
        prefix = (token_type_ids == 0) & real
        positions = real.long().cumsum(-1).masked_fill(~real, 1)
        x = self.embed(input_ids, pixel_values)
        masks = self.attention_masks(torch.arange(T, device=input_ids.device), prefix, real, prefix)
        return self.language_model(x, positions, masks)

    # --- incremental decoding ---------------------------------------------------------------------

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        t = self.config.text
        return KVCache.allocate(t.num_hidden_layers, batch, t.num_key_value_heads, t.head_dim, max_len,
                                self.dtype, self.device)

    def extend(self, cache: KVCache, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
               token_type_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
               image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Append (B, T) tokens to the cache and return the logits of the last slot, (B, vocab).

        Prefill is the first call (with the image); each decode step is a call with T = 1. Rows are kept
        aligned by padding, which must be on the left of a prompt so that the last slot is real.
        `attention_mask=None` means no padding; `token_type_ids=None` means all suffix (type 1).
        `image_features` may replace `pixel_values` (see `embed`).
        Only the last slot's logits are computed, so the last layer skips the other slots' attention
        output and MLP (their keys and values still go into the cache).
        """
        start, end, positions = cache.claim(input_ids, token_type_ids, attention_mask)
        x = self.embed(input_ids, pixel_values, image_features)
        q_slots = torch.arange(start, end, device=input_ids.device)
        masks = self.attention_masks(q_slots, cache.prefix[:, start:end], cache.valid[:, :end], cache.prefix[:, :end])
        h = self.language_model(x, positions, masks, cache, last_only=True)  # (B, 1, D)
        cache.length = end
        return self.language_model.logits(h[:, -1])
