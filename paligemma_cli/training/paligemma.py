"""Fine-tuning and from-scratch training of PaliGemma on a JSONL dataset.

The loss covers the suffix and `<eos>` only, under the prefix-LM mask, as in big_vision's PaliGemma
trainer. Data order is a pure function of (seed, step), and the learning rate a pure function of the
step, so a resumed run draws the same batches and ends exactly where an uninterrupted one would.

A run folder holds a complete model folder at its top (config.json, model.safetensors, the tokenizer,
train_config.yaml), which every other command loads, plus `trainer_state.pt` (what `--resume` needs)
and `metrics.jsonl`. Each file is replaced atomically.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from paligemma_cli.errors import PaliGemmaError

TRAINABLE = ("all", "decoder", "attention", "lora")

# Settings that decide what is trained and in which order: a resumed run must keep them, or it would
# silently train something other than the run it continues.
RESUME_FIXED = ("model_config", "batch_size", "grad_accum", "seed", "trainable", "lora_r", "lora_alpha")


@dataclass
class TrainConfig:
    data: str = ""
    out: str = ""
    model: str | None = None  # a checkpoint folder to fine-tune
    model_config: str | None = None  # or a named small config to train from scratch
    val_data: str | None = None
    steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    lr: float | None = None  # None: 1e-4 for LoRA, 2e-5 for full fine-tuning, 1e-3 from scratch
    weight_decay: float = 1e-6
    warmup_steps: int = 50
    schedule: str = "cosine"  # cosine | constant
    min_lr_ratio: float = 0.0
    clip: float = 1.0
    trainable: str | None = None  # None: lora for a checkpoint, all from scratch
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                              "gate_proj", "up_proj", "down_proj"])
    lora_save: str = "merged"  # merged | adapter
    precision: str = "auto"  # auto | bf16 | fp32
    gradient_checkpointing: bool = False
    seed: int = 0
    eval_every: int = 0
    eval_examples: int = 256
    save_every: int = 200
    log_every: int = 10
    max_length: int | None = None  # tokens per example incl. image tokens; None: the model's limit
    tokenizer_vocab_size: int = 512
    init_vision: str | None = None  # a vision tower to start from (see the contrastive trainer)

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
        if cfg.schedule not in ("cosine", "constant"):
            raise PaliGemmaError(f"--schedule must be cosine or constant, got {cfg.schedule!r}")
        if cfg.precision not in ("auto", "bf16", "fp32"):
            raise PaliGemmaError(f"--precision must be auto, bf16 or fp32, got {cfg.precision!r}")
        if cfg.lora_save not in ("merged", "adapter"):
            raise PaliGemmaError(f"--lora-save must be merged or adapter, got {cfg.lora_save!r}")
        if cfg.lora_save == "adapter" and cfg.trainable == "lora" and not cfg.model:
            raise PaliGemmaError("--lora-save adapter needs a base checkpoint (--model) for the adapter to apply to")
        if cfg.warmup_steps < 0 or cfg.log_every < 1 or cfg.save_every < 1:
            raise PaliGemmaError("--warmup-steps must be at least 0, --log-every and --save-every at least 1")
        return cfg

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Settings from YAML or flags, checked against the field types (YAML reads `1e-4` as a string)."""
        hints = typing.get_type_hints(cls)
        clean = {k.replace("-", "_"): v for k, v in d.items()}
        unknown = sorted(set(clean) - set(hints))
        if unknown:
            raise PaliGemmaError(f"unknown training setting(s): {', '.join(unknown)}; "
                                 f"known: {', '.join(f.name for f in dataclasses.fields(cls))}")
        return cls(**{k: _coerce(k, v, hints[k]) for k, v in clean.items()})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}


def _coerce(name: str, value, hint):
    """`value` as the type `hint` names (int, float, str, bool, list[str], or one of them | None)."""
    optional = isinstance(hint, types.UnionType)  # every union here is `X | None`
    if value is None and optional:
        return None
    kind = typing.get_args(hint)[0] if optional else hint
    kind = typing.get_origin(kind) or kind  # list[str] -> list
    if kind is float and isinstance(value, str):
        try:
            return float(value)  # PyYAML (YAML 1.1) reads 1e-4 as a string: it wants 1.0e-4
        except ValueError:
            pass
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        if kind is list and not all(isinstance(v, str) for v in value):
            raise PaliGemmaError(f"setting {name} must be a list of names, got {value!r}")
        return value
    raise PaliGemmaError(f"setting {name} must be {'a list' if kind is list else kind.__name__}, got {value!r}")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The learning rate of 0-based `step`: linear warmup over `warmup_steps`, then cosine decay
    toward `min_lr_ratio * lr`, which it would reach at step `steps` (one past the last), so the last
    step still learns."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    floor = cfg.min_lr_ratio * cfg.lr
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class BatchOrder:
    """Which examples make micro-batch m: a fresh permutation per epoch, seeded by (seed, epoch)."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if n < batch_size:
            raise PaliGemmaError(f"the dataset has {n} usable examples, fewer than the batch size {batch_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.per_epoch = n // batch_size
        self._epoch, self._perm = -1, None

    def __call__(self, micro_step: int) -> list[int]:
        epoch, i = divmod(micro_step, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g).tolist()
        return self._perm[i * self.batch_size:(i + 1) * self.batch_size]


def suffix_loss(model, batch: dict) -> torch.Tensor:
    """Cross-entropy of the suffix and <eos> tokens: averaged within each example, then over examples.

    big_vision's PaliGemma trainer normalises per example too: a one-word answer then weighs as much
    as a twenty-token caption, instead of captions drowning out the short VQA answers.
    """
    labels = batch["labels"][:, 1:]
    h = model.hidden_states(batch["input_ids"], batch["pixel_values"], batch["token_type_ids"],
                            batch["attention_mask"])[:, :-1]
    keep = labels != -100
    logits = model.language_model.logits(h[keep])
    per_token = F.cross_entropy(logits.float(), labels[keep], reduction="none")
    counts = keep.sum(1)
    per_example = torch.zeros(len(labels), device=per_token.device).index_add_(0, keep.nonzero()[:, 0], per_token)
    has_suffix = counts > 0
    return (per_example[has_suffix] / counts[has_suffix]).mean()


def init_weights(model, seed: int) -> None:
    """Random weights for training from scratch: the vision tower as SigLIP initialises it (but unit-scale
    positions), the projector and the Gemma decoder from N(0, 0.02) (Gemma's initializer_range), RMSNorms
    at identity."""
    from paligemma_cli.model.gemma import RMSNorm
    from paligemma_cli.model.siglip import init_siglip_weights

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


def pick_autocast(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    # auto: bf16 on GPUs that have it; on CPU float32, which is faster than emulated bf16 on most chips.
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


@dataclass
class TrainState:
    step: int = 0
    skipped_images: int = 0
    best_val: float | None = None


class Trainer:
    """Holds the model, data and optimizer; `run()` trains to `cfg.steps`, saving as it goes."""

    def __init__(self, cfg: TrainConfig, device: str | torch.device = "cpu",
                 on_log: Callable[[dict], None] | None = None, resume: bool = False):
        from paligemma_cli.data.jsonl import read_jsonl

        self.cfg = cfg = cfg.resolved()
        self.device = torch.device(device)
        self.on_log = on_log or (lambda m: None)
        self.out = Path(cfg.out)
        self.resuming = resume
        state_file = check_run_folder(self.out, resume)
        self.examples = read_jsonl(cfg.data)
        if not self.examples:
            raise PaliGemmaError(f"'{cfg.data}' has no examples")
        self.val_examples = read_jsonl(cfg.val_data)[: cfg.eval_examples] if cfg.val_data else []
        torch.manual_seed(cfg.seed)
        self._build_model()
        self._check_examples()
        self.order = BatchOrder(len(self.examples), cfg.batch_size, cfg.seed)
        params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
        )
        self.state = TrainState()
        self.saved_step = 0  # the step of the last checkpoint written, for messages
        self.bad_images: set[str] = set()  # unreadable files, skipped without reading them again
        self.autocast = pick_autocast(cfg.precision, self.device)
        self._updating = False  # True while weights and optimizer are part-way through one step
        if resume:
            self._load_state(state_file)
        else:  # the run folder records its settings from the start, not only at the first save
            self.out.mkdir(parents=True, exist_ok=True)
            _atomic_write_text(self.out / "train_config.yaml", self._config_yaml())

    # --- set-up --------------------------------------------------------------------------------

    def _build_model(self) -> None:
        from paligemma_cli.model.config import PaliGemmaConfig
        from paligemma_cli.training.lora import apply_lora
        from paligemma_cli.model.paligemma import PaliGemma
        from paligemma_cli.processing.processor import PaliGemmaProcessor
        from paligemma_cli.processing.tokenizer import PaliGemmaTokenizer

        cfg = self.cfg
        if cfg.model:
            from paligemma_cli.checkpoints.hf import stored_quantization

            if stored_quantization(Path(cfg.model)):
                raise PaliGemmaError(f"'{cfg.model}' holds int8 weights, which cannot be trained; "
                                     "train from the bf16 or float32 folder it was converted from")
            self.tokenizer_dir = Path(cfg.model)
            self.model = PaliGemma.from_pretrained(cfg.model, dtype=torch.float32, device=self.device)
            self.tokenizer = PaliGemmaTokenizer.from_folder(cfg.model)
        else:
            self.tokenizer_dir = self.out
            self.out.mkdir(parents=True, exist_ok=True)
            tok_path = self.out / "tokenizer.model"
            # A resumed run keeps its tokenizer; a new one never reuses a file left by a failed start.
            if not (self.resuming and tok_path.exists()):
                from paligemma_cli.training.tokenizer_training import train_tokenizer

                texts = []
                for ex in self.examples:
                    texts.append(ex.prefix)
                    texts.extend(ex.references)
                train_tokenizer(texts, tok_path, vocab_size=cfg.tokenizer_vocab_size)
            self.tokenizer = PaliGemmaTokenizer.from_file(tok_path)
            vocab = -(-(self.tokenizer.image_token_id + 1) // 64) * 64
            mcfg = PaliGemmaConfig.from_name(cfg.model_config, text__vocab_size=vocab,
                                             image_token_id=self.tokenizer.image_token_id)
            self.model = PaliGemma(mcfg).to(self.device)
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

    def _init_vision(self, path: str) -> None:
        from paligemma_cli.checkpoints.hf import load_vision_tower_state

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

    def _check_examples(self) -> None:
        """Drop examples whose image file is missing (counted for the summary); fail before any step
        when no image at all can be read. Reading stops at the first good image, so this is quick."""
        from paligemma_cli.processing.image import load_image

        usable = [ex for ex in self.examples if os.path.exists(ex.image)]
        self.missing_images = len(self.examples) - len(usable)
        if not usable:
            raise PaliGemmaError(f"'{self.cfg.data}' has no usable example: none of its image files exists "
                                 "(image paths are relative to the JSONL file)")
        for ex in usable:
            try:
                load_image(ex.image)
                break
            except PaliGemmaError:
                continue
        else:
            raise PaliGemmaError(f"'{self.cfg.data}' has no usable example: none of its {len(usable)} images can be read")
        self.examples = usable

    # --- batches -------------------------------------------------------------------------------

    def make_batch(self, examples) -> dict | None:
        from paligemma_cli.processing.image import load_image

        images, prefixes, suffixes = [], [], []
        for ex in examples:
            if str(ex.image) in self.bad_images:
                continue
            try:
                images.append(load_image(ex.image))
            except PaliGemmaError:
                self.bad_images.add(str(ex.image))
                self.state.skipped_images += 1  # each unreadable file counts once, however often drawn
                continue
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
        cfg = self.cfg
        step = self.state.step
        lr = lr_at(step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
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
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip) if cfg.clip > 0 else torch.tensor(0.0)
        self._updating = True
        self.optimizer.step()
        self.state.step += 1
        self._updating = False
        return {"step": self.state.step, "loss": total / max(n, 1), "lr": lr, "grad_norm": float(grad_norm)}

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        losses = []
        bs = self.cfg.batch_size
        for i in range(0, len(self.val_examples), bs):
            batch = self.make_batch(self.val_examples[i:i + bs])
            if batch is not None:
                losses.append(suffix_loss(self.model, batch).item())
        self.model.train()
        return sum(losses) / max(len(losses), 1)

    def run(self) -> dict:
        cfg = self.cfg
        t0, examples_seen = time.perf_counter(), 0
        last = {}
        try:
            while self.state.step < cfg.steps:
                metrics = self.train_step()
                examples_seen += cfg.batch_size * cfg.grad_accum
                elapsed = time.perf_counter() - t0
                metrics["examples_per_s"] = examples_seen / elapsed
                step = self.state.step
                if cfg.eval_every and self.val_examples and (step % cfg.eval_every == 0 or step == cfg.steps):
                    metrics["val_loss"] = self.evaluate()
                if step % cfg.log_every == 0 or step == cfg.steps or "val_loss" in metrics:
                    self._log(metrics)
                self.on_log(metrics)
                last = metrics
                if step % cfg.save_every == 0 and step < cfg.steps:
                    self.save()
        except KeyboardInterrupt:
            # Ctrl-C inside optimizer.step() leaves some weights updated and some not: keep the last
            # checkpoint then. Anywhere else the weights are those of a finished step.
            if not self._updating:
                self.save()
            raise
        self.save()
        return {**last, "steps": self.state.step, "skipped_images": self.state.skipped_images,
                "missing_images": self.missing_images, "out": str(self.out)}

    def _log(self, metrics: dict) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({**metrics, "time": time.time()}) + "\n")

    # --- saving and resuming -------------------------------------------------------------------

    def save(self) -> None:
        """Export the model folder, then the resume state; each file replaced atomically."""
        from paligemma_cli.checkpoints.hf import save_state_dict_folder
        from paligemma_cli.training.lora import lora_state_dict, merged_state_dict

        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        extra = {"train_config.yaml": self._config_yaml()}
        if cfg.trainable == "lora" and cfg.lora_save == "adapter":
            adapter = {k: v.detach().cpu() for k, v in lora_state_dict(self.model).items()}
            _atomic_save_tensors(adapter, self.out / "adapter_model.safetensors")
            extra["adapter_config.json"] = json.dumps(
                {"base_model": str(Path(cfg.model).resolve()), "r": cfg.lora_r, "alpha": cfg.lora_alpha,
                 "target_modules": list(cfg.lora_targets)}, indent=2)
            for name, text in extra.items():
                _atomic_write_text(self.out / name, text)
        else:
            save_state_dict_folder(self.model.config, merged_state_dict(self.model), self.out,
                                   tokenizer_dir=self.tokenizer_dir, extra_files=extra)
        trainable = {k: v.detach().cpu() for k, v in self.model.named_parameters() if v.requires_grad}
        state = {
            "step": self.state.step,
            "skipped_images": self.state.skipped_images,
            "bad_images": sorted(self.bad_images),
            "model": trainable,
            "optimizer": self.optimizer.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
            "config": cfg.to_dict(),
        }
        tmp = self.out / ".trainer_state.pt.tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.out / "trainer_state.pt")
        self.saved_step = self.state.step

    def _config_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.cfg.to_dict(), sort_keys=False)

    def _load_state(self, path: Path) -> None:
        # On the CPU: the RNG state must stay there; load_state_dict moves the rest to the model's device.
        state = torch.load(path, map_location="cpu", weights_only=False)
        saved = state.get("config", {})
        for name in RESUME_FIXED:
            if name in saved and saved[name] != getattr(self.cfg, name):
                raise PaliGemmaError(f"cannot resume '{self.out}' with {name} = {getattr(self.cfg, name)!r}: the run "
                                     f"used {saved[name]!r}; start a new run to change it")
        trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        result = self.model.load_state_dict(state["model"], strict=False)
        lacking = sorted(trainable - set(state["model"]))
        if result.unexpected_keys or lacking:
            raise PaliGemmaError(f"'{path}' does not belong to this configuration "
                                 f"(unexpected {result.unexpected_keys[:3]}, lacking {lacking[:3]})")
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        self.state.step = self.saved_step = state["step"]
        self.state.skipped_images = state["skipped_images"]
        self.bad_images = set(state.get("bad_images", []))  # absent in states saved before it was kept
        trim_metrics(self.out, self.state.step)

def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_save_tensors(state: dict, path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})  # the metadata transformers expects
    os.replace(tmp, path)


def check_run_folder(out: Path, resume: bool) -> Path:
    """The run's `trainer_state.pt` path, after refusing a resume with nothing to resume or a new run
    over an old one (or over a model folder, e.g. the checkpoint being fine-tuned)."""
    state_file = out / "trainer_state.pt"
    if resume and not state_file.exists():
        raise PaliGemmaError(f"nothing to resume in '{out}' (no trainer_state.pt); start the run without --resume")
    if not resume and state_file.exists():
        raise PaliGemmaError(f"'{out}' already holds a run; pass --resume to continue it or choose another --out")
    if not resume and (out / "config.json").exists():
        raise PaliGemmaError(f"'{out}' already holds a model; choose another --out for the run")
    return state_file


def trim_metrics(out: Path, step: int) -> None:
    """Drop metrics logged after the checkpoint (a run killed between saves): they are redone."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    keep = [line for line in lines if json.loads(line).get("step", 0) <= step]
    if len(keep) != len(lines):
        _atomic_write_text(path, "".join(line + "\n" for line in keep))
