"""Training the mask VQ-VAE (`--objective vqvae`): the tokenizer behind PaliGemma's `<seg>` tokens.

References: Ning et al. 2023 (AiT, arXiv:2301.02229) and its `vae/models/VQVAE.py` and
`vae/configs/insseg/ait_insseg_vqvae.py` (the architecture big_vision's `vae-oid.npz` has, its loss
and optimiser: MSE to 2*mask - 1 plus 0.25 x commitment, EMA codebook, AdamW lr 3e-4 without weight
decay, cosine schedule with warmup); big_vision `pp/proj/paligemma/segmentation.py` (what a training
mask is: the object's box, cropped from the full mask and stretched to 64x64).

Data: a JSONL whose lines name a mask image in `mask` (as `demo-data --task segment` writes) or, failing
that, in `image` (as `demo-data --task mask` writes); foreground is every pixel above half. Each mask
is cropped to the box of its foreground and stretched to 64x64 once, at the start (4 KB per mask).

The run folder holds `vae-oid.npz` (the checkpoint `segment`, `eval` and `demo-data --vae` read),
`train_config.yaml`, `metrics.jsonl` and the resume state. One addition to AiT's recipe: codes no mask
has used for a while restart on encoder outputs (`dead_code_usage`; 0 turns it off).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np
import torch
from PIL import Image

from paligemma_cli.checkpoints.vae import VAE_FILENAME, load_vae, save_vae
from paligemma_cli.data.jsonl import read_jsonl
from paligemma_cli.errors import PaliGemmaError
from paligemma_cli.model.vqvae import VQVAE, mask_iou, vqvae_loss
from paligemma_cli.processing.segmentation import crop_mask, mask_box
from paligemma_cli.training.common import BatchOrder, RunSettings, TrainerBase, adamw


@dataclass
class VQVAETrainConfig(RunSettings):
    data: str = ""  # JSONL naming mask images (`mask`, else `image`)
    objective: str = "vqvae"
    model: str | None = None  # a vae-oid.npz to continue from (with its encoder)
    val_data: str | None = None
    batch_size: int = 64
    lr: float | None = None  # None: AiT's 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    codebook_dim: int = 512  # D, the width of a code (AiT's; vae-oid.npz's is read from the file)
    dead_code_usage: float = 0.01  # a code used by fewer vectors per batch (moving average) restarts; 0: never
    eval_every: int = 0
    eval_examples: int = 1000

    resume_fixed: ClassVar[tuple[str, ...]] = ("objective", "model", "batch_size", "seed", "codebook_dim")

    def resolved(self) -> "VQVAETrainConfig":
        cfg = dataclasses.replace(self)
        if cfg.model_config or cfg.max_length is not None:
            raise PaliGemmaError("--model-config and --max-length do not apply to --objective vqvae "
                                 "(--model may name a vae-oid.npz to continue from)")
        if cfg.lr is None:
            cfg.lr = 3e-4
        if cfg.steps < 1 or cfg.batch_size < 1 or cfg.codebook_dim < 1:
            raise PaliGemmaError("--steps, --batch-size and codebook_dim must be at least 1")
        if cfg.dead_code_usage < 0:
            raise PaliGemmaError("dead_code_usage must be at least 0")
        cfg.check_common()
        return cfg

    @classmethod
    def unknown_settings(cls, names: list[str]) -> PaliGemmaError:
        return PaliGemmaError(f"setting(s) {', '.join(names)} do not apply to --objective vqvae; "
                              f"it takes: {', '.join(sorted(cls.field_names()))}")


def read_mask_crops(path: str, limit: int | None = None) -> tuple[torch.Tensor, int]:
    """(uint8 (N, 64, 64) crops, 0..255, of every readable non-empty mask in the JSONL `path`, how many
    lines were skipped: unreadable or empty)."""
    crops, skipped = [], 0
    for ex in read_jsonl(path)[:limit]:
        try:
            with Image.open(ex.mask or ex.image) as im:
                full = np.asarray(im.convert("L")) > 127
        except (OSError, ValueError, SyntaxError):
            skipped += 1
            continue
        box = mask_box(full)
        crop = None if box is None else crop_mask(full, box)
        if crop is None:
            skipped += 1
            continue
        crops.append(np.round(crop * 255).astype(np.uint8))
    if not crops:
        raise PaliGemmaError(f"'{path}' names no readable, non-empty mask image (in \"mask\", else \"image\")")
    return torch.from_numpy(np.stack(crops)), skipped


class VQVAETrainer(TrainerBase):
    """Holds the VQ-VAE, the mask crops and the optimizer; `run()` trains to `cfg.steps`, saving as it goes."""

    def __init__(self, cfg: VQVAETrainConfig, device: str | torch.device = "cpu",
                 on_log: Callable[[dict], None] | None = None, resume: bool = False):
        super().__init__(cfg.resolved(), device, on_log, resume)

    def setup(self) -> None:
        cfg = self.cfg
        self.crops, self.missing_images = read_mask_crops(cfg.data)
        self.val_crops = read_mask_crops(cfg.val_data, cfg.eval_examples)[0] if cfg.val_data else None
        torch.manual_seed(cfg.seed)
        if cfg.model:
            self.model, has_encoder = load_vae(cfg.model, self.device)
            if not has_encoder:
                raise PaliGemmaError(f"'{cfg.model}' holds only a decoder; training needs the encoder too")
            self.model.train()
        else:
            self.model = VQVAE(cfg.codebook_dim).to(self.device).train()
        # Channels-last: oneDNN's preferred layout for these small convolutions on the CPU.
        self.model.to(memory_format=torch.channels_last)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.order = BatchOrder(len(self.crops), cfg.batch_size, cfg.seed)
        # The codebook is not a parameter (it moves by EMA), so the optimizer never touches it.
        self.optimizer = adamw(self.model, cfg)
        self.examples_per_step = cfg.batch_size

    def batch(self, crops: torch.Tensor) -> torch.Tensor:
        masks = (crops.float() / 255)[:, None].to(self.device)  # (B, 1, 64, 64) in [0, 1]
        return masks.contiguous(memory_format=torch.channels_last)

    def train_step(self) -> dict:
        lr = self.begin_step()
        masks = self.batch(self.crops[self.order(self.state.step)])
        restarted = 0
        if self.cfg.dead_code_usage:
            with torch.no_grad():
                z = self.model.encode(masks)
            restarted = self.model._vq_vae.restart_dead_codes(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]),
                                                              self.cfg.dead_code_usage, self.generator)
        loss, stats = vqvae_loss(self.model, masks)
        loss.backward()
        grad_norm = self.finish_step()
        return {"step": self.state.step, "loss": loss.item(), "lr": lr, "grad_norm": grad_norm, **stats,
                "restarted_codes": restarted}

    def after_step(self, metrics: dict) -> None:
        cfg, step = self.cfg, self.state.step
        if cfg.eval_every and self.val_crops is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
            metrics["val_iou"], metrics["val_codes_used"] = self.evaluate()

    @torch.no_grad()
    def evaluate(self) -> tuple[float, int]:
        """(mean IoU of decode(encode(mask)) > 0 against mask > 0.5 at 64x64, distinct codes used)."""
        self.model.eval()
        ious, used = [], set()
        for start in range(0, len(self.val_crops), 256):
            masks = self.batch(self.val_crops[start:start + 256])
            codes = self.model.codes(masks)
            used.update(codes.unique().tolist())
            ious.append(mask_iou(self.model.decode_codes(codes) > 0, masks[:, 0] > 0.5))
        self.model.train()
        return float(torch.cat(ious).mean()), len(used)

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        save_vae(self.model, self.out / VAE_FILENAME)
        self.save_resume_state({k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()})

    def check_saved_settings(self, saved: dict) -> None:
        if saved.get("objective") != "vqvae":
            raise PaliGemmaError(f"'{self.out}' holds the state of another kind of run; resume it without "
                                 "--objective vqvae")
        super().check_saved_settings(saved)

    def load_weights(self, weights: dict[str, torch.Tensor], path: Path) -> None:
        self.model.load_state_dict(weights, strict=True)
