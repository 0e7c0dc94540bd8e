"""The VQ-VAE that turns PaliGemma's 16 `<segNNN>` tokens into a 64x64 mask, and masks into tokens.

References: Ning et al., "All in Tokens: Unifying Output Space of Visual Tasks via Soft Token" (AiT,
arXiv:2301.02229), whose `vae/models/VQVAE.py` this mirrors module for module, so a `state_dict` has
the names of big_vision's `vae-oid.npz`; big_vision `evaluators/proj/paligemma/transfers/segmentation.py`
(the decoder PaliGemma's numbers were measured with) and `pp/proj/paligemma/segmentation.py` (the
encoder that wrote the training targets); van den Oord et al. 2017 (VQ-VAE with an EMA codebook).

A mask is the content of an object's box stretched to 64x64: the encoder takes it to a 4x4 grid of
D-dim vectors, each snapped to the nearest of 128 codebook rows (the token is the row's index, read
row-major: token k is cell (k // 4, k % 4)); the decoder takes the grid back to 64x64. The decoder was
trained to regress 2*mask - 1 with no output activation, so its output is roughly in [-1, 1] and the
foreground is where it is > 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NUM_CODES = 128  # <seg000> ... <seg127>
GRID = 4  # 4x4 = 16 tokens per mask
MASK_SIZE = 64
CHANNELS = (16, 32, 64, 128)  # widths of the four stride-2 stages, from the mask side


class ResBlock(nn.Module):
    """x + conv1x1(relu(conv3x3(relu(conv3x3(x))))): no activation after the sum."""

    def __init__(self, channels: int = 128):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class VectorQuantizerEMA(nn.Module):
    """The codebook, kept up to date by exponential moving averages rather than by gradients.

    Buffers, named as AiT's: `_embedding` [128, D] (the codebook; in `vae-oid.npz`), `_ema_cluster_size`
    [128] and `_ema_w` [128, D] (training state only). In training mode each forward moves every code
    toward the mean of the encoder outputs assigned to it (decay 0.99, Laplace smoothing eps 1e-5).
    """

    def __init__(self, dim: int, num_codes: int = NUM_CODES, decay: float = 0.99, eps: float = 1e-5):
        super().__init__()
        self.decay, self.eps = decay, eps
        self.register_buffer("_embedding", torch.randn(num_codes, dim))
        self.register_buffer("_ema_cluster_size", torch.zeros(num_codes))
        self.register_buffer("_ema_w", self._embedding.clone())

    @property
    def dim(self) -> int:
        return self._embedding.shape[1]

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """(N, D) vectors -> (N,) index of the nearest code (squared L2, as big_vision's encoder)."""
        e = self._embedding
        distances = z.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * z @ e.T  # (N, 128)
        return distances.argmin(1)

    @torch.no_grad()
    def ema_update(self, z: torch.Tensor, idx: torch.Tensor) -> None:
        """Move the codes toward the mean of their assigned vectors z (N, D)."""
        onehot = F.one_hot(idx, self._embedding.shape[0]).to(z.dtype)  # (N, 128)
        d = self.decay
        self._ema_cluster_size.mul_(d).add_(onehot.sum(0), alpha=1 - d)
        n = self._ema_cluster_size.sum()
        # Laplace smoothing keeps a code nobody picked from dividing by zero.
        size = (self._ema_cluster_size + self.eps) / (n + len(onehot[0]) * self.eps) * n
        self._ema_w.mul_(d).add_(onehot.T @ z, alpha=1 - d)
        self._embedding.copy_(self._ema_w / size[:, None])

    @torch.no_grad()
    def restart_dead_codes(self, z: torch.Tensor, min_usage: float = 0.01,
                           generator: torch.Generator | None = None) -> int:
        """Move every code whose moving-average use has fallen below `min_usage` vectors per batch onto a
        randomly drawn row of z (N, D); returns how many moved.

        Not in AiT's recipe: there a code that no vector picks early (all of them, bar one, when the
        N(0, 1) codebook starts far from a fresh encoder's small outputs) never comes back, and on a
        world of few mask shapes training settled on one code for everything. Restarting dead codes
        on encoder outputs (as Jukebox does, Dhariwal et al. 2020) keeps the whole codebook in play.
        """
        dead = self._ema_cluster_size < min_usage
        n = int(dead.sum())
        if n:
            pick = torch.randint(0, z.shape[0], (n,), generator=generator, device=z.device)
            self._embedding[dead] = z[pick]
            self._ema_w[dead] = z[pick]
            self._ema_cluster_size[dead] = 1.0
        return n


class VQVAE(nn.Module):
    """Encoder, codebook and decoder of PaliGemma's mask tokenizer; D (the code width) is free.

    `nn.Sequential` indices are part of the checkpoint names (`decoder.4.weight`, ...), which is why
    the activations are modules here.
    """

    def __init__(self, dim: int = 512, num_codes: int = NUM_CODES):
        super().__init__()
        c1, c2, c3, c4 = CHANNELS
        self.encoder = nn.Sequential(
            nn.Conv2d(1, c1, 4, stride=2, padding=1), nn.ReLU(),  # 0, 1: 64 -> 32
            nn.Conv2d(c1, c2, 4, stride=2, padding=1), nn.ReLU(),  # 2, 3: -> 16
            nn.Conv2d(c2, c3, 4, stride=2, padding=1), nn.ReLU(),  # 4, 5: -> 8
            nn.Conv2d(c3, c4, 4, stride=2, padding=1), nn.ReLU(),  # 6, 7: -> 4
            ResBlock(c4), ResBlock(c4),  # 8, 9
            nn.Conv2d(c4, dim, 1),  # 10
        )
        self._vq_vae = VectorQuantizerEMA(dim, num_codes)
        self.decoder = nn.Sequential(
            nn.Conv2d(dim, c4, 1), nn.ReLU(),  # 0, 1
            ResBlock(c4), ResBlock(c4),  # 2, 3
            nn.ConvTranspose2d(c4, c4, 4, stride=2, padding=1), nn.ReLU(),  # 4, 5: 4 -> 8
            nn.ConvTranspose2d(c4, c3, 4, stride=2, padding=1), nn.ReLU(),  # 6, 7: -> 16
            nn.ConvTranspose2d(c3, c2, 4, stride=2, padding=1), nn.ReLU(),  # 8, 9: -> 32
            nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1), nn.ReLU(),  # 10, 11: -> 64
            nn.Conv2d(c1, 1, 1),  # 12
        )

    @property
    def dim(self) -> int:
        return self._vq_vae.dim

    # --- the two halves -----------------------------------------------------------------------------

    def encode(self, masks: torch.Tensor) -> torch.Tensor:
        """(B, 1, 64, 64) masks in [0, 1] -> (B, D, 4, 4) encoder outputs, before quantization."""
        return self.encoder(2 * (masks - 0.5))  # to [-1, 1], as big_vision's `_norm`

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, D, 4, 4) -> (codes (B, 16) int64, quantized (B, D, 4, 4))."""
        B, D = z.shape[:2]
        flat = z.permute(0, 2, 3, 1).reshape(-1, D)  # row-major cells: token k is cell (k // 4, k % 4)
        idx = self._vq_vae.nearest(flat)
        q = self._vq_vae._embedding[idx].view(B, GRID, GRID, D).permute(0, 3, 1, 2)
        return idx.view(B, GRID * GRID), q

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, 16) codes in 0..127 -> (B, D, 4, 4) grid of codebook rows."""
        B = codes.shape[0]
        return self._vq_vae._embedding[codes.reshape(-1)].view(B, GRID, GRID, -1).permute(0, 3, 1, 2)

    def decode(self, q: torch.Tensor) -> torch.Tensor:
        """(B, D, 4, 4) -> (B, 1, 64, 64) raw logits-like output; foreground where > 0."""
        return self.decoder(q)

    # --- what callers use -----------------------------------------------------------------------------

    @torch.no_grad()
    def codes(self, masks: torch.Tensor) -> torch.Tensor:
        """(B, 1, 64, 64) masks in [0, 1] -> (B, 16) codebook indices: the `<segNNN>` numbers."""
        return self.quantize(self.encode(masks))[0]

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, 16) codebook indices -> (B, 64, 64) float32 decoder output (foreground where > 0)."""
        return self.decode(self.embed_codes(codes.long()))[:, 0].float()

    def forward(self, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: (reconstruction (B, 1, 64, 64), commitment MSE, codes (B, 16)).

        Gradients reach the encoder through the straight-through estimator (the decoder's input is
        z + (q - z).detach()); in training mode the codebook moves by EMA toward the encoder outputs.
        """
        z = self.encode(masks)
        codes, q = self.quantize(z)
        if self.training:
            self._vq_vae.ema_update(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).detach(), codes.reshape(-1))
        commitment = F.mse_loss(z, q.detach())
        recon = self.decode(z + (q - z).detach())
        return recon, commitment, codes


COMMITMENT_COST = 0.25  # AiT's weight of the commitment term


def vqvae_loss(model: VQVAE, masks: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """AiT's loss: MSE of the reconstruction against 2*mask - 1, plus 0.25 x commitment.

    Returns (loss, {"recon": ..., "commitment": ..., "iou": mean IoU of (output > 0) vs (mask > 0.5)}).
    """
    recon, commitment, _ = model(masks)
    target = 2 * masks - 1
    recon_loss = F.mse_loss(recon, target)
    with torch.no_grad():
        iou = mask_iou(recon > 0, masks > 0.5).mean()
    stats = {"recon": recon_loss.item(), "commitment": commitment.item(), "iou": iou.item()}
    return recon_loss + COMMITMENT_COST * commitment, stats


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-example IoU of two boolean masks (B, ...); 1 where both are empty."""
    a, b = a.flatten(1), b.flatten(1)
    inter = (a & b).sum(1).float()
    union = (a | b).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
