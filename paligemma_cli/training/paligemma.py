"""Fine-tuning and from-scratch training of PaliGemma on a JSONL dataset.

The loss covers the suffix and `<eos>` only, under the prefix-LM mask, as in big_vision's PaliGemma
trainer. The run folder holds a complete model folder at its top (config.json, model.safetensors, the
tokenizer, train_config.yaml), which every other command loads, plus the resume state and metrics
(see `common.py`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from paligemma_cli.checkpoints.atomic import atomic_save_tensors
from paligemma_cli.checkpoints.hf import (
    load_model,
    load_vision_tower_state,
    save_state_dict_folder,
    stored_quantization,
)
from paligemma_cli.data.jsonl import read_jsonl
from paligemma_cli.distributed import (
    SHARDINGS,
    World,
    clip_grad_norm,
    gathered,
    gathered_optimizer_state,
    gradient_sync,
    shard_optimizer_state,
    wrap_for_training,
)
from paligemma_cli.errors import PaliGemmaError
from paligemma_cli.model.config import PaliGemmaConfig
from paligemma_cli.model.gemma import RMSNorm
from paligemma_cli.model.lora import DECODER_LINEARS, apply_lora, merged_state_dict
from paligemma_cli.model.paligemma import PaliGemma
from paligemma_cli.model.siglip import init_siglip_weights
from paligemma_cli.outputs import atomic_write_text
from paligemma_cli.processing.processor import PaliGemmaProcessor
from paligemma_cli.processing.tokenizer import PaliGemmaTokenizer
from paligemma_cli.training.common import BatchOrder, RunSettings, TrainerBase, adamw, usable_examples
from paligemma_cli.training.tokenizer_training import train_tokenizer

TRAINABLE = ("all", "decoder", "attention", "lora")


@dataclass
class TrainConfig(RunSettings):
    model: str | None = None  # a checkpoint folder to fine-tune
    model_config: str | None = None  # or a named small config to train from scratch
    val_data: str | None = None
    batch_size: int = 16
    grad_accum: int = 1
    lr: float | None = None  # None: 1e-4 for LoRA, 2e-5 for full fine-tuning, 1e-3 from scratch
    weight_decay: float = 1e-6
    trainable: str | None = None  # None: lora for a checkpoint, all from scratch
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=lambda: list(DECODER_LINEARS))
    lora_save: str = "merged"  # merged | adapter
    gradient_checkpointing: bool = False
    eval_every: int = 0
    eval_examples: int = 256
    max_length: int | None = None  # tokens per example incl. image tokens; None: the model's limit
    init_vision: str | None = None  # a vision tower to start from (see the contrastive trainer)

    resume_fixed: ClassVar[tuple[str, ...]] = ("model_config", "batch_size", "grad_accum", "seed", "trainable",
                                               "lora_r", "lora_alpha")

    def resolved(self) -> "TrainConfig":
        cfg = dataclasses.replace(self)
        if bool(cfg.model) == bool(cfg.model_config):
            raise PaliGemmaError("give exactly one of --model (a checkpoint to fine-tune) or --model-config (from scratch)")
        if cfg.trainable is None:
            cfg.trainable = "lora" if cfg.model else "all"
        if cfg.trainable not in TRAINABLE:
            raise PaliGemmaError(f"--trainable must be one of {', '.join(TRAINABLE)}, got {cfg.trainable!r}")
        if cfg.lr is None:
            cfg.lr = 1e-4 if cfg.trainable == "lora" else (2e-5 if cfg.model else 1e-3)
        if cfg.steps < 1 or cfg.batch_size < 1 or cfg.grad_accum < 1:
            raise PaliGemmaError("--steps, --batch-size and --grad-accum must be at least 1")
        if cfg.lora_r < 1:
            raise PaliGemmaError(f"--lora-r must be at least 1, got {cfg.lora_r}")
        if not (math.isfinite(cfg.lora_alpha) and cfg.lora_alpha > 0):
            raise PaliGemmaError(f"--lora-alpha must be a finite number > 0, got {cfg.lora_alpha}")
        if cfg.eval_every < 0 or cfg.eval_examples < 1:
            raise PaliGemmaError("--eval-every must be at least 0 and eval_examples at least 1")
        if cfg.max_length is not None and cfg.max_length < 2:
            raise PaliGemmaError(f"--max-length must be at least 2, got {cfg.max_length}")
        cfg.check_common()
        if cfg.lora_save not in ("merged", "adapter"):
            raise PaliGemmaError(f"--lora-save must be merged or adapter, got {cfg.lora_save!r}")
        if cfg.lora_save == "adapter" and cfg.trainable == "lora" and not cfg.model:
            raise PaliGemmaError("--lora-save adapter needs a base checkpoint (--model) for the adapter to apply to")
        return cfg


def suffix_loss(model, batch: dict) -> torch.Tensor:
    """Cross-entropy of the suffix and <eos> tokens: averaged within each example, then over examples.

    big_vision's PaliGemma trainer normalises per example too: a one-word answer then weighs as much
    as a twenty-token caption, instead of captions drowning out the short VQA answers.
    """
    return suffix_losses(model, batch).mean()


def suffix_losses(model, batch: dict) -> torch.Tensor:
    """(n,) the mean suffix cross-entropy of each example that has a suffix (`suffix_loss` averages them)."""
    labels = batch["labels"][:, 1:]
    h = model.hidden_states(batch["input_ids"], batch["pixel_values"], batch["token_type_ids"],
                            batch["attention_mask"])[:, :-1]
    keep = labels != -100
    logits = model.language_model.logits(h[keep])
    per_token = F.cross_entropy(logits.float(), labels[keep], reduction="none")
    counts = keep.sum(1)
    per_example = torch.zeros(len(labels), device=per_token.device).index_add_(0, keep.nonzero()[:, 0], per_token)
    has_suffix = counts > 0
    return per_example[has_suffix] / counts[has_suffix]


class SuffixLosses(nn.Module):
    """`suffix_losses` as a module's forward, for DDP and FSDP2, which act in `forward` (gradient
    hooks, gathering the shards of the parameters)."""

    def __init__(self, model: PaliGemma):
        super().__init__()
        self.model = model

    def forward(self, batch: dict) -> torch.Tensor:
        return suffix_losses(self.model, batch)


def init_weights(model: PaliGemma, seed: int) -> None:
    """Random weights for training from scratch: the vision tower as SigLIP initialises it (but unit-scale
    positions), the projector and the Gemma decoder from N(0, 0.02) (Gemma's initializer_range), RMSNorms
    at identity."""
    rms_norms = {n for n, m in model.named_modules() if isinstance(m, RMSNorm)}
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        init_siglip_weights(model.vision_tower)
        # Unit-scale positions, as nn.Embedding's default: at SigLIP's 1/sqrt(width) they are small beside the
        # patch content, attention smooths all patches alike, and the model cannot tell which shape is where.
        model.vision_tower.embeddings.position_embedding.weight.normal_(0, 1)
        for name, p in model.named_parameters():
            if name.startswith("vision_tower."):
                continue
            owner, kind = name.rsplit(".", 1)
            if owner in rms_norms or kind == "bias":
                p.zero_()  # RMSNorm scales by (1 + w): zero is the identity
            else:
                p.normal_(0, 0.02)


class Trainer(TrainerBase):
    """Holds the model, data and optimizer; `run()` trains to `cfg.steps`, saving as it goes.

    On a `world` of several ranks (torchrun) `cfg.batch_size` stays the global batch: each rank takes its
    share of every micro-batch, the loss is the sum of its examples' losses over the global number of
    examples, and DDP or FSDP2 (`sharding`) sums the ranks' gradients, so a step is the one-process
    step on the whole batch. The gradient norm is the global one.
    """

    def __init__(self, cfg: TrainConfig, device: str | torch.device = "cpu",
                 on_log: Callable[[dict], None] | None = None, resume: bool = False,
                 world: World | None = None, sharding: str = "ddp"):
        if sharding not in SHARDINGS:
            raise PaliGemmaError(f"--sharding must be ddp or fsdp, got {sharding!r}")
        self.sharding = sharding
        self.engine = None  # the model wrapped for several ranks (parallelize)
        self._stand_in = None
        world = world or World(device=torch.device(device))
        super().__init__(world.agree(lambda: self._resolved(cfg, world)), world.device, on_log, resume, world)

    @staticmethod
    def _resolved(cfg: TrainConfig, world: World) -> TrainConfig:
        cfg = cfg.resolved()
        if cfg.batch_size < world.size:
            raise PaliGemmaError(f"--batch-size {cfg.batch_size} is smaller than the {world.size} processes: "
                                 "each needs at least one example of every batch")
        return cfg

    def setup(self) -> None:
        cfg = self.cfg
        self.examples = read_jsonl(cfg.data)
        if not self.examples:
            raise PaliGemmaError(f"'{cfg.data}' has no examples")
        self.val_examples = read_jsonl(cfg.val_data)[: cfg.eval_examples] if cfg.val_data else []
        torch.manual_seed(cfg.seed)
        self._build_model()
        self.examples, self.missing_images = usable_examples(self.examples, cfg.data)
        self.order = BatchOrder(len(self.examples), cfg.batch_size, cfg.seed)
        self.optimizer = adamw(self.model, cfg)
        self.examples_per_step = cfg.batch_size * cfg.grad_accum

    # --- set-up --------------------------------------------------------------------------------

    def _build_model(self) -> None:
        cfg = self.cfg
        if cfg.model:
            if stored_quantization(Path(cfg.model)):
                raise PaliGemmaError(f"'{cfg.model}' holds int8 weights, which cannot be trained; "
                                     "train from the bf16 or float32 folder it was converted from")
            self.tokenizer_dir = Path(cfg.model)
            self.model = load_model(cfg.model, dtype=torch.float32, device=self._build_device())
            self.tokenizer = PaliGemmaTokenizer.from_folder(cfg.model)
        else:
            self.tokenizer_dir = self.out
            tok_path = self.out / "tokenizer.model"
            # A resumed run keeps its tokenizer; a new one never reuses a file left by a failed start.
            if not (self.resuming and tok_path.exists()):
                texts = []
                for ex in self.examples:
                    texts.append(ex.prefix)
                    texts.extend(ex.references)
                if self.world.is_main:
                    self.out.mkdir(parents=True, exist_ok=True)
                    train_tokenizer(texts, tok_path, vocab_size=cfg.tokenizer_vocab_size)
                else:  # the same texts give the same tokenizer: the other ranks train theirs aside
                    with tempfile.TemporaryDirectory() as tmp:
                        own = train_tokenizer(texts, Path(tmp) / "tokenizer.model", vocab_size=cfg.tokenizer_vocab_size)
                        self.tokenizer = PaliGemmaTokenizer.from_file(own)
            if self.world.is_main or (self.resuming and tok_path.exists()):
                self.tokenizer = PaliGemmaTokenizer.from_file(tok_path)
            vocab = -(-(self.tokenizer.image_token_id + 1) // 64) * 64
            mcfg = PaliGemmaConfig.from_name(cfg.model_config, text__vocab_size=vocab,
                                             image_token_id=self.tokenizer.image_token_id)
            self.model = PaliGemma(mcfg).to(self._build_device())
            init_weights(self.model, cfg.seed)
        mcfg = self.model.config
        if self.tokenizer.image_token_id != mcfg.image_token_id or self.tokenizer.image_token_id > mcfg.text.vocab_size:
            raise PaliGemmaError(
                f"tokenizer and model do not match: the tokenizer's <image> is {self.tokenizer.image_token_id}, "
                f"the model's is {mcfg.image_token_id} (vocabulary {mcfg.text.vocab_size}); "
                f"put the tokenizer.model that came with the weights in '{self.tokenizer_dir}'"
            )
        if cfg.init_vision:
            self._init_vision(cfg.init_vision)
        self.processor = PaliGemmaProcessor(self.tokenizer, mcfg.image_size, mcfg.num_image_tokens)
        self._set_trainable()
        if cfg.trainable == "lora":
            apply_lora(self.model, cfg.lora_r, cfg.lora_alpha, tuple(cfg.lora_targets))
        if cfg.gradient_checkpointing:
            self.model.language_model.gradient_checkpointing = True
            self.model.vision_tower.encoder.gradient_checkpointing = True
        self.model.train()

    def _build_device(self) -> torch.device:
        # FSDP2 moves each rank's shards to the GPU: the whole model stays in host memory, never on one GPU.
        if self.world.distributed and self.sharding == "fsdp":
            return torch.device("cpu")
        return self.device

    def _init_vision(self, path: str) -> None:
        state = load_vision_tower_state(path)
        try:
            self.model.vision_tower.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise PaliGemmaError(f"--init-vision '{path}' does not fit this model's vision tower: {str(e).splitlines()[0]}") from None

    def _set_trainable(self) -> None:
        mode = self.cfg.trainable
        for name, p in self.model.named_parameters():
            if mode == "all":
                p.requires_grad_(True)
            elif mode == "decoder":
                p.requires_grad_(name.startswith("language_model."))
            elif mode == "attention":
                p.requires_grad_(".self_attn." in name and name.startswith("language_model."))
            else:  # lora: adapters are added after this and are the only trainable weights
                p.requires_grad_(False)

    # --- batches -------------------------------------------------------------------------------

    def make_batch(self, examples) -> dict | None:
        images, prefixes, suffixes = [], [], []
        for ex in examples:
            image = self.read_image(ex.image)
            if image is None:
                continue
            images.append(image)
            prefixes.append(ex.prefix)
            suffixes.append(ex.references[0])
        if not images:
            return None
        max_length = self.cfg.max_length or self.model.config.text.max_position_embeddings
        batch = self.processor(prefixes, images=images, suffixes=suffixes, padding_side="right",
                               max_length=max_length)
        return {k: v.to(self.device) for k, v in batch.items()}

    # --- the loop ------------------------------------------------------------------------------

    def train_step(self) -> dict:
        if self.world.distributed:
            return self._distributed_step()
        cfg, step = self.cfg, self.state.step
        lr = self.begin_step()
        total, n = 0.0, 0
        for a in range(cfg.grad_accum):
            batch = self.make_batch([self.examples[i] for i in self.order(step * cfg.grad_accum + a)])
            if batch is None:
                continue
            with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
                loss = suffix_loss(self.model, batch)
            (loss / cfg.grad_accum).backward()
            total += loss.item()
            n += 1
        grad_norm = self.finish_step()
        return {"step": self.state.step, "loss": total / max(n, 1), "lr": lr, "grad_norm": grad_norm}

    def _distributed_step(self) -> dict:
        cfg, step = self.cfg, self.state.step
        lr = self.begin_step()
        total, n = 0.0, 0
        for a in range(cfg.grad_accum):
            batch, weight = self.local_batch([self.examples[i] for i in self.order(step * cfg.grad_accum + a)])
            with gradient_sync(self.engine, a == cfg.grad_accum - 1), \
                    torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
                losses = self.engine(batch)
                local = losses.sum() * weight
                loss_sum, count = self.world.all_sum([local.item(), len(losses) * weight])
                # DDP and FSDP2 average the ranks' gradients: scaled by the world size, the sum over the
                # global batch's examples divided by their number is the one-process per-example mean.
                (local * (self.world.size / max(count, 1) / cfg.grad_accum)).backward()
            if count:
                total += loss_sum / count
                n += 1
        grad_norm = self.finish_step()
        return {"step": self.state.step, "loss": total / max(n, 1), "lr": lr, "grad_norm": grad_norm}

    def local_batch(self, examples: list) -> tuple[dict, int]:
        """(this rank's share of `examples` as a batch, 1), or (a stand-in batch, 0) when none of its
        images can be read: every rank must run the forward and backward, whose collectives the others
        wait for, and a loss weighed 0 adds nothing."""
        batch = self.make_batch(list(self.world.shard(examples)))
        if batch is not None:
            return batch, 1
        if self._stand_in is None:
            self._stand_in = next(ex for ex in self.examples if self.read_image(ex.image) is not None)
        return self.make_batch([self._stand_in]), 0

    def clip_gradients(self, params: list) -> torch.Tensor:
        if self.world.distributed and self.sharding == "fsdp":
            return clip_grad_norm(params, self.cfg.clip)
        return super().clip_gradients(params)

    def after_step(self, metrics: dict) -> None:
        cfg, step = self.cfg, self.state.step
        if cfg.eval_every and self.val_examples and (step % cfg.eval_every == 0 or step == cfg.steps):
            metrics["val_loss"] = self.evaluate()

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        losses = []
        bs = self.cfg.batch_size
        for i in range(0, len(self.val_examples), bs):
            if self.world.distributed:  # each rank its share of the batch, as in training
                batch, weight = self.local_batch(self.val_examples[i:i + bs])
                losses = self.engine(batch)
                loss_sum, count = self.world.all_sum([losses.sum().item() * weight, len(losses) * weight])
                if count:
                    losses.append(loss_sum / count)
                continue
            batch = self.make_batch(self.val_examples[i:i + bs])
            if batch is not None:
                losses.append(suffix_loss(self.model, batch).item())
        self.model.train()
        return sum(losses) / max(len(losses), 1)

    # --- saving and resuming -------------------------------------------------------------------

    def parallelize(self) -> None:
        """Wrap the model for DDP, or shard it with FSDP2 (each decoder and vision layer a unit, the rest
        the root), and move the optimizer (and any resumed state) onto the sharded parameters."""
        blocks = [*self.model.language_model.layers, *self.model.vision_tower.encoder.layers]
        whole = self.optimizer.state_dict()
        self.engine = wrap_for_training(SuffixLosses(self.model), self.world, self.sharding,
                                        blocks if self.sharding == "fsdp" else ())
        if self.sharding == "fsdp":
            self.optimizer = adamw(self.model, self.cfg)
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            self.optimizer.load_state_dict(shard_optimizer_state(whole, params))

    def save(self) -> None:
        """Export the model folder, then the resume state; each file replaced atomically."""
        self.write(self.snapshot())

    def snapshot(self) -> dict:
        """The state dict, the names of the trained weights and, when sharded, the whole optimizer state;
        under FSDP2 gathered from the ranks' shards (held by rank 0 only)."""
        state = self.model.state_dict()
        trained = [k for k, v in self.model.named_parameters() if v.requires_grad]
        optimizer = None
        if self.world.distributed and self.sharding == "fsdp":
            if self.cfg.trainable == "lora" and self.cfg.lora_save == "adapter":  # the frozen base is not written
                state = {k: v for k, v in state.items() if "lora_A" in k or "lora_B" in k or k in trained}
            state = gathered(state, keep=self.world.is_main)
            optimizer = gathered_optimizer_state(self.optimizer.state_dict(), keep=self.world.is_main)
        return {"state": state, "trained": trained, "optimizer": optimizer}

    def write(self, snapshot: dict) -> None:
        cfg, state = self.cfg, snapshot["state"]
        self.out.mkdir(parents=True, exist_ok=True)
        extra = {"train_config.yaml": self.config_yaml()}
        if cfg.trainable == "lora" and cfg.lora_save == "adapter":
            adapter = {k: v.detach().cpu() for k, v in state.items() if "lora_A" in k or "lora_B" in k}
            atomic_save_tensors(adapter, self.out / "adapter_model.safetensors")
            extra["adapter_config.json"] = json.dumps(
                {"base_model": str(Path(cfg.model).resolve()), "r": cfg.lora_r, "alpha": cfg.lora_alpha,
                 "target_modules": list(cfg.lora_targets)}, indent=2)
            for name, text in extra.items():
                atomic_write_text(self.out / name, text)
        else:
            save_state_dict_folder(self.model.config, merged_state_dict(self.model, state), self.out,
                                   tokenizer_dir=self.tokenizer_dir, extra_files=extra)
        self.save_resume_state({k: state[k].detach().cpu() for k in snapshot["trained"]}, snapshot["optimizer"])

    def load_weights(self, weights: dict[str, torch.Tensor], path: Path) -> None:
        trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        result = self.model.load_state_dict(weights, strict=False)
        lacking = sorted(trainable - set(weights))
        if result.unexpected_keys or lacking:
            raise PaliGemmaError(f"'{path}' does not belong to this configuration "
                                 f"(unexpected {result.unexpected_keys[:3]}, lacking {lacking[:3]})")
