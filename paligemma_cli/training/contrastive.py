"""Contrastive training of a SigLIP dual encoder on image-caption pairs (sigmoid or CLIP softmax loss).

References: Zhai et al., "Sigmoid Loss for Language Image Pre-Training" (2023) and big_vision's
`trainers/proj/image_text/siglip.py`; Radford et al. (CLIP, 2021) for the softmax objective. The losses
are in `contrastive_loss.py`, the model in `model/siglip.py`, the loop in `common.py`. The run folder is
a complete dual-encoder checkpoint (config.json + model.safetensors in `transformers`' `SiglipModel`
layout, tokenizer.model), which `paligemma classify`, `paligemma eval --task retrieval` and
`paligemma train --init-vision` load, plus the resume state and metrics.

Only caption lines are used (`task` "caption" or none): the caption is `suffix` (its first reference).
With `hard_negatives` = K, each image also brings up to K of its line's `negatives` (wrong captions
close to its own), drawn afresh each step; they join the batch's texts as extra negatives for every image.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

import torch

from paligemma_cli.checkpoints.atomic import atomic_save_tensors
from paligemma_cli.checkpoints.hf import load_dual_encoder
from paligemma_cli.data.jsonl import caption_examples, read_jsonl
from paligemma_cli.errors import PaliGemmaError
from paligemma_cli.model.config import SiglipConfig
from paligemma_cli.model.siglip import DualEncoder
from paligemma_cli.outputs import atomic_write_text
from paligemma_cli.processing.image import preprocess
from paligemma_cli.processing.siglip_tokenizer import SiglipTokenizer
from paligemma_cli.training.common import BatchOrder, RunSettings, TrainerBase, adamw, usable_examples
from paligemma_cli.training.contrastive_loss import CLIP_INIT_LOGIT_SCALE, clip_loss, siglip_loss, siglip_loss_chunked
from paligemma_cli.training.tokenizer_training import train_siglip_tokenizer

CONTRASTIVE_OBJECTIVES = ("siglip", "clip")


@dataclass
class ContrastiveTrainConfig(RunSettings):
    data: str = ""  # JSONL of image-caption pairs: the caption is `suffix`
    objective: str = "siglip"  # siglip (sigmoid loss) | clip (softmax loss)
    model: str | None = None  # a dual-encoder checkpoint folder to continue from
    model_config: str | None = None  # or a named SiglipConfig to train from scratch, e.g. siglip-demo-64
    batch_size: int = 64  # contrastive losses want large batches: every other pair is a negative
    lr: float | None = None  # None: 1e-3 from scratch, 1e-5 from a checkpoint
    weight_decay: float = 1e-4  # on matrices only, not on norms, biases, temperature or bias
    chunk_size: int = 0  # SigLIP loss over blocks of this many texts (0: the whole batch at once)
    max_length: int | None = None  # from scratch: text positions (None: the preset's); a checkpoint keeps its own
    tokenizer_vocab_size: int = 1000
    hard_negatives: int = 0  # per image and step, up to this many of its line's `negatives` join the batch

    resume_fixed: ClassVar[tuple[str, ...]] = ("objective", "model", "model_config", "batch_size", "seed",
                                               "max_length", "tokenizer_vocab_size", "hard_negatives")

    def resolved(self) -> "ContrastiveTrainConfig":
        cfg = dataclasses.replace(self)
        if cfg.objective not in CONTRASTIVE_OBJECTIVES:
            raise PaliGemmaError(f"--objective must be one of {', '.join(CONTRASTIVE_OBJECTIVES)}, got {cfg.objective!r}")
        if bool(cfg.model) == bool(cfg.model_config):
            raise PaliGemmaError("give exactly one of --model (a dual-encoder checkpoint) or --model-config "
                                 "(from scratch, e.g. siglip-demo-64)")
        if cfg.model and cfg.max_length is not None:
            raise PaliGemmaError("max_length applies only from scratch: a checkpoint pads texts to its own length")
        if cfg.lr is None:
            cfg.lr = 1e-5 if cfg.model else 1e-3
        if cfg.steps < 1 or cfg.batch_size < 2:
            raise PaliGemmaError("--steps must be at least 1 and --batch-size at least 2 (pairs need negatives)")
        cfg.check_common()
        if cfg.chunk_size < 0 or cfg.hard_negatives < 0:
            raise PaliGemmaError("--hard-negatives and chunk_size must be at least 0")
        if cfg.max_length is not None and cfg.max_length < 2:
            raise PaliGemmaError("max_length must be at least 2 (a token and </s>)")
        return cfg

    @classmethod
    def unknown_settings(cls, names: list[str]) -> PaliGemmaError:
        return PaliGemmaError(f"setting(s) {', '.join(names)} do not apply to contrastive training "
                              f"(--objective siglip/clip); it takes: {', '.join(sorted(cls.field_names()))}")


def contrastive_loss(model: DualEncoder, pixel_values: torch.Tensor, input_ids: torch.Tensor, objective: str,
                     chunk_size: int = 0) -> torch.Tensor:
    """The batch's loss: pair i is (image i, text i), every other pairing is a negative."""
    img, txt = model.encode_image(pixel_values), model.encode_text(input_ids)  # (B, D) each
    # The loss sums B² terms scaled by a temperature of up to 100: float32 even under bf16 autocast.
    with torch.autocast(img.device.type, enabled=False):
        img, txt = img.float(), txt.float()
        if objective == "clip":
            return clip_loss(img, txt, model.logit_scale)
        if chunk_size:
            return siglip_loss_chunked(img, txt, model.logit_scale, model.logit_bias, chunk_size)
        return siglip_loss(img, txt, model.logit_scale, model.logit_bias)


class ContrastiveTrainer(TrainerBase):
    """Holds the dual encoder, data and optimizer; `run()` trains to `cfg.steps`, saving as it goes.

    Same interface as the captioning `Trainer` (cfg, state.step, on_log, run(), save()), so
    `paligemma train` drives either with the same progress display.
    """

    def __init__(self, cfg: ContrastiveTrainConfig, device: str | torch.device = "cpu",
                 on_log: Callable[[dict], None] | None = None, resume: bool = False):
        super().__init__(cfg.resolved(), device, on_log, resume)

    def setup(self) -> None:
        cfg = self.cfg
        everything = read_jsonl(cfg.data)
        self.examples = caption_examples(everything)
        if not self.examples:
            raise PaliGemmaError(f"'{cfg.data}' has no caption lines (lines with task \"caption\" or no task) "
                                 f"among its {len(everything)} example(s)")
        self.examples, self.missing_images = usable_examples(self.examples, cfg.data)
        if cfg.hard_negatives and not any(ex.negatives for ex in self.examples):
            raise PaliGemmaError(f"--hard-negatives needs wrong captions in a \"negatives\" list on the caption "
                                 f"lines; '{cfg.data}' has none (`paligemma demo-data --task caption` writes them)")
        torch.manual_seed(cfg.seed)
        self._build_model()
        # Captions never change, so they are tokenised once; images are read per batch to keep memory flat.
        self.input_ids = self.tokenizer([ex.references[0] for ex in self.examples])  # (N, T)
        # Negatives likewise, all in one tensor: those of example i are rows first[i] .. first[i+1]-1.
        counts = [len(ex.negatives) if cfg.hard_negatives else 0 for ex in self.examples]
        self.negative_first = [0, *itertools.accumulate(counts)]
        self.negative_ids = self.tokenizer([n for ex in self.examples for n in ex.negatives]) if sum(counts) else None
        self.order = BatchOrder(len(self.examples), cfg.batch_size, cfg.seed)
        self.optimizer = adamw(self.model, cfg)  # no decay on the temperature: it would bias it
        self.examples_per_step = cfg.batch_size

    # --- set-up --------------------------------------------------------------------------------

    def _build_model(self) -> None:
        cfg = self.cfg
        if cfg.model:
            self.model = load_dual_encoder(cfg.model, dtype=torch.float32, device=self.device)
            self.tokenizer = SiglipTokenizer.from_folder(cfg.model, self.model.config.text)
        else:
            tok_path = self.out / "tokenizer.model"
            # A resumed run keeps its tokenizer; a new one never reuses a file left by a failed start.
            if not (self.resuming and tok_path.exists()):
                train_siglip_tokenizer([ex.references[0] for ex in self.examples], tok_path, cfg.tokenizer_vocab_size)
            mcfg = SiglipConfig.from_name(cfg.model_config)
            if cfg.max_length is not None:
                mcfg.text.max_position_embeddings = cfg.max_length
            probe = SiglipTokenizer.from_file(tok_path)
            mcfg.text.vocab_size = probe.vocab_size
            mcfg.text.pad_token_id = mcfg.text.eos_token_id = probe.eos_id  # SigLIP pads with </s>
            self.tokenizer = SiglipTokenizer.from_folder(self.out, mcfg.text)
            self.model = DualEncoder(mcfg).to(self.device)  # DualEncoder's own init, seeded above
        if cfg.objective == "clip":
            if not cfg.model:
                with torch.no_grad():
                    self.model.logit_scale.fill_(CLIP_INIT_LOGIT_SCALE)
                    self.model.logit_bias.zero_()
            # The softmax loss is blind to a shared bias; left trainable it would only drift with weight decay.
            self.model.logit_bias.requires_grad_(False)
        self.model.train()

    # --- batches -------------------------------------------------------------------------------

    def make_batch(self, indices: list[int], step: int = 0) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(pixel_values (B, 3, S, S), input_ids (B + M, T)); unreadable images drop out (each counted once).

        Rows past B of input_ids are the M hard negatives, drawn as a pure function of (seed, step)."""
        images, rows = [], []
        for i in indices:
            image = self.read_image(self.examples[i].image)
            if image is not None:
                images.append(image)
                rows.append(i)
        if len(rows) < 2:  # one pair has no negative to learn from
            return None
        pixel_values = preprocess(images, self.model.config.vision.image_size)
        texts = self.input_ids[rows]
        if self.negative_ids is not None:
            rng = random.Random(f"negatives:{self.cfg.seed}:{step}")
            picked = []
            for i in rows:
                first, end = self.negative_first[i], self.negative_first[i + 1]
                picked += rng.sample(range(first, end), min(self.cfg.hard_negatives, end - first))
            texts = torch.cat([texts, self.negative_ids[picked]])
        return pixel_values.to(self.device), texts.to(self.device)

    # --- the loop ------------------------------------------------------------------------------

    def train_step(self) -> dict:
        cfg = self.cfg
        lr = self.begin_step()
        batch = self.make_batch(self.order(self.state.step), self.state.step)
        loss = float("nan")
        if batch is not None:
            with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
                value = contrastive_loss(self.model, *batch, cfg.objective, cfg.chunk_size)
            value.backward()
            loss = value.item()
        grad_norm = self.finish_step()
        return {"step": self.state.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                "temperature": self.model.logit_scale.exp().item(), "bias": self.model.logit_bias.item()}

    # --- saving and resuming -------------------------------------------------------------------

    def save(self) -> None:
        """The checkpoint files (as `save_dual_encoder` lays them out) and then the resume state.

        Not `save_dual_encoder` itself: it swaps in a whole new folder, which would drop the run's
        metrics and resume state.
        """
        self.out.mkdir(parents=True, exist_ok=True)
        weights = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        atomic_write_text(self.out / "config.json", json.dumps(self.model.config.to_dict(), indent=2) + "\n")
        atomic_save_tensors(weights, self.out / "model.safetensors")
        tok = Path(self.tokenizer.path)
        if tok.resolve() != (self.out / "tokenizer.model").resolve():  # from a checkpoint: bring its tokenizer
            tmp = self.out / ".tokenizer.model.tmp"
            shutil.copyfile(tok, tmp)
            os.replace(tmp, self.out / "tokenizer.model")
        atomic_write_text(self.out / "train_config.yaml", self.config_yaml())
        self.save_resume_state(weights)

    def check_saved_settings(self, saved: dict) -> None:
        if "objective" not in saved:
            raise PaliGemmaError(f"'{self.out}' holds the state of a captioning run; resume it without --objective")
        super().check_saved_settings(saved)

    def load_weights(self, weights: dict[str, torch.Tensor], path: Path) -> None:
        self.model.load_state_dict(weights, strict=True)


def run_contrastive_training(settings: dict, resume: bool = False, device: str | torch.device = "cpu",
                             on_log: Callable[[dict], None] | None = None) -> dict:
    """Train a dual encoder from a settings dict (YAML keys or flag names); returns the run summary.

    The summary has the last step's metrics (loss, lr, temperature, bias, ...) plus steps,
    skipped_images, missing_images and out (the checkpoint folder).
    """
    cfg = ContrastiveTrainConfig.from_dict(settings)
    return ContrastiveTrainer(cfg, device=device, on_log=on_log, resume=resume).run()
