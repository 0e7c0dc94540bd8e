"""SigLIP: the vision tower PaliGemma uses (So400m/14, no pooling head), and the dual encoder it comes from.

References: Zhai et al., "Sigmoid Loss for Language Image Pre-Training" (2023); big_vision's ViT
(`models/vit.py`, MAP head) and `models/proj/image_text/two_towers.py`;
`transformers.models.siglip.modeling_siglip`. Module names follow the checkpoint keys
(`embeddings.patch_embedding`, `encoder.layers.N.self_attn.q_proj`, ...), so loading is a plain
`load_state_dict`.

The dual encoder is the tower with a MAP pooling head, a text tower, and a learned temperature and bias.
Scores follow `transformers`: both pooled vectors are L2-normalised and
`logits = cos_sim * exp(logit_scale) + logit_bias`; `sigmoid(logits)` is the per-pair probability. A tower
trained here drops into PaliGemma through `DualEncoder.vision_tower_state_dict()`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from paligemma_cli.errors import PaliGemmaError
from paligemma_cli.model.config import SiglipConfig, SiglipTextConfig, VisionConfig

SIGLIP_INIT_LOGIT_SCALE = math.log(10.0)
SIGLIP_INIT_LOGIT_BIAS = -10.0  # starts every pair near "negative": with B² - B negatives, that is the prior


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


# --- the dual encoder -------------------------------------------------------------------------------


class MapHead(nn.Module):
    """Multihead attention pooling: one learned query (`probe`) attends to all patches, then a residual MLP.

    `torch.nn.MultiheadAttention` is used as is because its parameter names (`in_proj_weight` packing
    q, k, v; `out_proj`) are exactly the checkpoint's.
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.probe = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.attention = nn.MultiheadAttention(cfg.hidden_size, cfg.num_attention_heads, batch_first=True)
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) patch states -> (B, D) pooled."""
        probe = self.probe.expand(x.shape[0], -1, -1)  # (B, 1, D)
        x = self.attention(probe, x, x, need_weights=False)[0]  # (B, 1, D)
        x = x + self.mlp(self.layernorm(x))  # the residual is around the MLP only, not the attention
        return x[:, 0]


class SiglipVisionWithHead(SiglipVisionTower):
    """PaliGemma's vision tower plus the MAP head; `forward` returns the pooled vector, not patch states.

    Subclassing keeps the tower's parameter names (`embeddings.*`, `encoder.*`, `post_layernorm.*`), so
    the checkpoint's `vision_model.*` keys and PaliGemma's `vision_tower.*` keys differ only by `head.*`.
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__(cfg)
        self.head = MapHead(cfg)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [-1, 1] -> (B, D) pooled image embedding (not normalised)."""
        return self.head(super().forward(pixel_values))


class SiglipTextEmbeddings(nn.Module):
    def __init__(self, cfg: SiglipTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        T = input_ids.shape[1]
        return self.token_embedding(input_ids) + self.position_embedding.weight[:T]  # (B, T, D)


class SiglipTextTower(nn.Module):
    """Token + learned position embeddings, bidirectional pre-LN encoder, final LayerNorm, last position, head."""

    def __init__(self, cfg: SiglipTextConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = SiglipTextEmbeddings(cfg)
        self.encoder = SiglipEncoder(
            cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size, cfg.num_hidden_layers, cfg.layer_norm_eps
        )
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.output_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) token ids, T <= max_position_embeddings -> (B, P) pooled text embedding (not normalised).

        SigLIP was trained on texts padded to `max_position_embeddings` with no attention mask, and pools
        the **last** position (usually a pad token that has attended to the whole text). Pass
        `attention_mask` (B, T; 1 = real token) only to reproduce a caller that masks padding keys.
        """
        T, limit = input_ids.shape[1], self.config.max_position_embeddings
        if T > limit:
            raise PaliGemmaError(f"text is {T} tokens but the SigLIP text tower takes at most {limit}: truncate it")
        mask = None
        if attention_mask is not None:
            mask = attention_mask[:, None, None, :].bool()  # (B, 1, 1, T): masks keys, every query still runs
        x = self.encoder(self.embeddings(input_ids), mask)  # (B, T, D)
        return self.head(self.final_layer_norm(x)[:, -1])  # (B, P)


class DualEncoder(nn.Module):
    """SigLIP image and text towers with a learned temperature and bias (HF's `SiglipModel` layout).

    `DualEncoder(cfg)` is freshly initialised for training from scratch (SigLIP's init:
    `logit_scale = log 10`, `logit_bias = -10`); `checkpoints.hf.load_dual_encoder(folder)` loads one.
    To train: `siglip_loss(m.encode_image(px), m.encode_text(ids), m.logit_scale, m.logit_bias)`.
    """

    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        if cfg.text.output_size != cfg.vision.hidden_size:
            raise PaliGemmaError(f"text projection size {cfg.text.output_size} must equal the vision hidden size "
                                 f"{cfg.vision.hidden_size}: the two embeddings are compared by dot product")
        self.config = cfg
        self.vision_model = SiglipVisionWithHead(cfg.vision)
        self.text_model = SiglipTextTower(cfg.text)
        self.logit_scale = nn.Parameter(torch.zeros(1))  # shape [1] as in the checkpoint
        self.logit_bias = nn.Parameter(torch.zeros(1))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random init as big_vision / HF `SiglipModel` do it, for training from scratch."""
        init_siglip_weights(self)
        for m in self.modules():
            if isinstance(m, MapHead):
                nn.init.xavier_uniform_(m.probe)
                nn.init.xavier_uniform_(m.attention.in_proj_weight)
                nn.init.zeros_(m.attention.in_proj_bias)
        self.logit_scale.fill_(SIGLIP_INIT_LOGIT_SCALE)
        self.logit_bias.fill_(SIGLIP_INIT_LOGIT_BIAS)

    @property
    def dtype(self) -> torch.dtype:
        return self.logit_scale.dtype

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [-1, 1] -> (B, D) pooled image embeddings, not normalised (HF `get_image_features`)."""
        return self.vision_model(pixel_values.to(self.dtype))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids padded to max_position_embeddings -> (B, D) pooled text embeddings, not normalised."""
        return self.text_model(input_ids, attention_mask)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (logits_per_image (B_img, B_txt), logits_per_text (B_txt, B_img)), as `SiglipModel` does."""
        img = F.normalize(self.encode_image(pixel_values), dim=-1)  # (B_img, D)
        txt = F.normalize(self.encode_text(input_ids, attention_mask), dim=-1)  # (B_txt, D)
        logits_per_text = txt @ img.T * self.logit_scale.exp() + self.logit_bias  # (B_txt, B_img)
        return logits_per_text.T, logits_per_text

    def vision_tower_state_dict(self) -> dict[str, torch.Tensor]:
        """The image tower without its head, named as `SiglipVisionTower` names it (`embeddings.*`,
        `encoder.*`, `post_layernorm.*`): `PaliGemma(cfg).vision_tower.load_state_dict(...)` takes it as is."""
        return {k: v for k, v in self.vision_model.state_dict().items() if not k.startswith("head.")}
