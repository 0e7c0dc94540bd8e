"""SigLIP vision tower (So400m/14 in PaliGemma), without the pooling head.

References: Zhai et al., "Sigmoid Loss for Language Image Pre-Training" (2023); big_vision's ViT;
`transformers.models.siglip.modeling_siglip`. Module names follow the checkpoint keys
(`embeddings.patch_embedding`, `encoder.layers.N.self_attn.q_proj`, ...), so loading is a plain
`load_state_dict`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from paligemma_cli.model.config import VisionConfig


class SiglipAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = (p(x).view(B, T, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, T, hd), scale hd**-0.5
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))


class SiglipMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipEncoderLayer(nn.Module):
    """Pre-LN transformer block; shared by the vision tower and SigLIP's text tower."""

    def __init__(self, dim: int, heads: int, mlp: int, eps: float):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.self_attn = SiglipAttention(dim, heads)
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = SiglipMLP(dim, mlp)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int, layers: int, eps: float):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(dim, heads, mlp, eps) for _ in range(layers))
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, mask, use_reentrant=False)
            else:
                x = layer(x, mask)
        return x


class SiglipVisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.num_patches, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (B, D, S/p, S/p)
        x = x.flatten(2).transpose(1, 2)  # (B, N, D), patches row-major
        return x + self.position_embedding.weight


class SiglipVisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = SiglipVisionEmbeddings(cfg)
        self.encoder = SiglipEncoder(
            cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size, cfg.num_hidden_layers, cfg.layer_norm_eps
        )
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [-1, 1] -> (B, N, D) patch states."""
        return self.post_layernorm(self.encoder(self.embeddings(pixel_values)))


@torch.no_grad()
def init_siglip_weights(module: nn.Module) -> None:
    """Random init for training a SigLIP tower from scratch, as big_vision and HF `SiglipModel` do it.

    LeCun normal for the patch stem and plain linears and 1/sqrt(width) for embedding tables keep
    activations at unit scale; Xavier inside the transformer blocks gives attention logits that are not
    all zero at step 0, so patches attend to their neighbours from the start instead of to the mean.
    """
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(m.weight, std=m.weight[0].numel() ** -0.5)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=m.weight.shape[1] ** -0.5)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for m in module.modules():  # second pass, so Xavier wins inside the blocks
        if isinstance(m, SiglipAttention):
            for lin in (m.q_proj, m.k_proj, m.v_proj, m.out_proj):
                nn.init.xavier_uniform_(lin.weight)
        elif isinstance(m, SiglipMLP):
            nn.init.xavier_uniform_(m.fc1.weight)
            nn.init.xavier_uniform_(m.fc2.weight)
