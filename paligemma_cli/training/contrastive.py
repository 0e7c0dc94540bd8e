"""Contrastive training of a SigLIP dual encoder on image-caption pairs (sigmoid or CLIP softmax loss).

References: Zhai et al., "Sigmoid Loss for Language Image Pre-Training" (2023) and big_vision's
`trainers/proj/image_text/siglip.py`; Radford et al. (CLIP, 2021) for the softmax objective. The losses
are in `contrastive_loss.py`, the model in `siglip_dual_encoder.py`.

The run works like `training.py`'s PaliGemma trainer, whose pure pieces it reuses: data order is a pure
function of (seed, step) (`BatchOrder`) and the learning rate of the step (`lr_at`), so a resumed run
ends exactly where an uninterrupted one would. The run folder is a complete dual-encoder checkpoint
(config.json + model.safetensors in `transformers`' `SiglipModel` layout, tokenizer.model), which
`paligemma classify`, `paligemma eval --task retrieval` and `paligemma train --init-vision` load, plus
`train_config.yaml`, `metrics.jsonl` and `trainer_state.pt` (what `--resume` needs). Each file is
replaced atomically.

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
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from paligemma_cli.model.config import VisionConfig
from paligemma_cli.training.contrastive_loss import CLIP_INIT_LOGIT_SCALE, clip_loss, siglip_loss, siglip_loss_chunked
from paligemma_cli.errors import PaliGemmaError
from paligemma_cli.model.dual_encoder_tmp import SIGLIP_PRESETS, DualEncoder, SiglipConfig, SiglipTextConfig
from paligemma_cli.training.paligemma import (BatchOrder, _atomic_save_tensors, _atomic_write_text, _coerce,
                                         check_run_folder, lr_at, pick_autocast, trim_metrics)

CONTRASTIVE_OBJECTIVES = ("siglip", "clip")

# Settings a resumed run must keep, or it would silently train something other than the run it continues.
RESUME_FIXED = ("objective", "model", "model_config", "batch_size", "seed", "max_length", "tokenizer_vocab_size",
                "hard_negatives")


# --- small presets for training from scratch ----------------------------------------------------------


def _siglip_demo_64() -> SiglipConfig:
    """~2M parameters; the image tower is exactly `demo-64`'s, so `paligemma train --model-config demo-64
    --init-vision RUN` can start from it. The vocabulary is set from the tokenizer trained for the run."""
    vision = VisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                          image_size=64, patch_size=8)
    text = SiglipTextConfig(vocab_size=1000, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=64)
    return SiglipConfig(vision=vision, text=text)


def _siglip_tiny_32() -> SiglipConfig:
    """A ~60k-parameter dual encoder for tests; the image tower is `tiny-32`'s. Texts are 16 tokens."""
    vision = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          image_size=32, patch_size=8)
    text = SiglipTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=16)
    return SiglipConfig(vision=vision, text=text)


# Registered here, not in siglip_dual_encoder.py, because they only make sense with a trained tokenizer.
SIGLIP_PRESETS.setdefault("siglip-demo-64", _siglip_demo_64)
SIGLIP_PRESETS.setdefault("siglip-tiny-32", _siglip_tiny_32)


# --- configuration ---------------------------------------------------------------------------------


@dataclass
class ContrastiveTrainConfig:
    data: str = ""  # JSONL of image-caption pairs: the caption is `suffix`
    out: str = ""
    objective: str = "siglip"  # siglip (sigmoid loss) | clip (softmax loss)
    model: str | None = None  # a dual-encoder checkpoint folder to continue from
    model_config: str | None = None  # or a named SiglipConfig to train from scratch, e.g. siglip-demo-64
    steps: int = 1000
    batch_size: int = 64  # contrastive losses want large batches: every other pair is a negative
    lr: float | None = None  # None: 1e-3 from scratch, 1e-5 from a checkpoint
    weight_decay: float = 1e-4  # on matrices only, not on norms, biases, temperature or bias
    warmup_steps: int = 50
    schedule: str = "cosine"  # cosine | constant
    min_lr_ratio: float = 0.0
    clip: float = 1.0  # gradient-norm clip (0 disables)
    chunk_size: int = 0  # SigLIP loss over blocks of this many texts (0: the whole batch at once)
    precision: str = "auto"  # auto | bf16 | fp32
    seed: int = 0
    save_every: int = 200
    log_every: int = 10
    max_length: int | None = None  # from scratch: text positions (None: the preset's); a checkpoint keeps its own
    tokenizer_vocab_size: int = 1000  # upper bound for the tokenizer trained from scratch
    hard_negatives: int = 0  # per image and step, up to this many of its line's `negatives` join the batch

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
        if cfg.schedule not in ("cosine", "constant"):
            raise PaliGemmaError(f"--schedule must be cosine or constant, got {cfg.schedule!r}")
        if cfg.precision not in ("auto", "bf16", "fp32"):
            raise PaliGemmaError(f"--precision must be auto, bf16 or fp32, got {cfg.precision!r}")
        if cfg.warmup_steps < 0 or cfg.chunk_size < 0 or cfg.hard_negatives < 0 or cfg.log_every < 1 or cfg.save_every < 1:
            raise PaliGemmaError("--warmup-steps, --hard-negatives and chunk_size must be at least 0, "
                                 "--log-every and --save-every at least 1")
        if cfg.max_length is not None and cfg.max_length < 2:
            raise PaliGemmaError("max_length must be at least 2 (a token and </s>)")
        return cfg

    @classmethod
    def from_dict(cls, d: dict) -> "ContrastiveTrainConfig":
        """Settings from YAML or flags (keys with - or _), checked against the field types."""
        hints = typing.get_type_hints(cls)
        clean = {k.replace("-", "_"): v for k, v in d.items()}
        unknown = sorted(set(clean) - set(hints))
        if unknown:
            raise PaliGemmaError(f"setting(s) {', '.join(unknown)} do not apply to contrastive training "
                                 f"(--objective siglip/clip); it takes: {', '.join(hints)}")
        return cls(**{k: _coerce(k, v, hints[k]) for k, v in clean.items()})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- the trainer -----------------------------------------------------------------------------------


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


@dataclass
class ContrastiveState:
    step: int = 0
    skipped_images: int = 0


class ContrastiveTrainer:
    """Holds the dual encoder, data and optimizer; `run()` trains to `cfg.steps`, saving as it goes.

    Same interface as `training.Trainer` (cfg, state.step, on_log, run(), save()), so `paligemma train`
    drives either with the same progress display.
    """

    def __init__(self, cfg: ContrastiveTrainConfig, device: str | torch.device = "cpu",
                 on_log: Callable[[dict], None] | None = None, resume: bool = False):
        from paligemma_cli.data.jsonl import read_jsonl
        from paligemma_cli.evaluation.retrieval import caption_examples

        self.cfg = cfg = cfg.resolved()
        self.device = torch.device(device)
        self.on_log = on_log or (lambda m: None)
        self.out = Path(cfg.out)
        self.resuming = resume
        state_file = check_run_folder(self.out, resume)
        everything = read_jsonl(cfg.data)
        self.examples = caption_examples(everything)
        if not self.examples:
            raise PaliGemmaError(f"'{cfg.data}' has no caption lines (lines with task \"caption\" or no task) "
                                 f"among its {len(everything)} example(s)")
        self._check_examples()
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
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],  # decaying the temperature would bias it
            lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
        )
        self.state = ContrastiveState()
        self.bad_images: set[str] = set()
        self.autocast = pick_autocast(cfg.precision, self.device)
        self._updating = False
        if resume:
            self._load_state(state_file)
        else:
            self.out.mkdir(parents=True, exist_ok=True)
            _atomic_write_text(self.out / "train_config.yaml", self._config_yaml())

    # --- set-up --------------------------------------------------------------------------------

    def _check_examples(self) -> None:
        """Drop lines whose image file is missing; fail before any step when no image can be read."""
        from paligemma_cli.processing.image import load_image

        usable = [ex for ex in self.examples if os.path.exists(ex.image)]
        self.missing_images = len(self.examples) - len(usable)
        for ex in usable:  # stops at the first good image, so this is quick
            try:
                load_image(ex.image)
                break
            except PaliGemmaError:
                continue
        else:
            raise PaliGemmaError(f"'{self.cfg.data}' has no usable example: none of its images can be read "
                                 "(image paths are relative to the JSONL file)")
        self.examples = usable

    def _build_model(self) -> None:
        from paligemma_cli.processing.siglip_tokenizer import SiglipTokenizer, train_siglip_tokenizer

        cfg = self.cfg
        if cfg.model:
            self.model = DualEncoder.from_pretrained(cfg.model, dtype=torch.float32, device=self.device)
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
        from paligemma_cli.processing.image import load_image, preprocess

        images, rows = [], []
        for i in indices:
            path = str(self.examples[i].image)
            if path in self.bad_images:
                continue
            try:
                images.append(load_image(path))
                rows.append(i)
            except PaliGemmaError:
                self.bad_images.add(path)
                self.state.skipped_images += 1
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
        lr = lr_at(self.state.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        batch = self.make_batch(self.order(self.state.step), self.state.step)
        loss = float("nan")
        if batch is not None:
            with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
                value = contrastive_loss(self.model, *batch, cfg.objective, cfg.chunk_size)
            value.backward()
            loss = value.item()
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip) if cfg.clip > 0 else torch.tensor(0.0)
        self._updating = True
        self.optimizer.step()
        self.state.step += 1
        self._updating = False
        return {"step": self.state.step, "loss": loss, "lr": lr, "grad_norm": float(grad_norm),
                "temperature": self.model.logit_scale.exp().item(), "bias": self.model.logit_bias.item()}

    def run(self) -> dict:
        cfg = self.cfg
        t0, seen, last = time.perf_counter(), 0, {}
        try:
            while self.state.step < cfg.steps:
                metrics = self.train_step()
                seen += cfg.batch_size
                metrics["examples_per_s"] = seen / (time.perf_counter() - t0)
                step = self.state.step
                if step % cfg.log_every == 0 or step == cfg.steps:
                    self._log(metrics)
                self.on_log(metrics)
                last = metrics
                if step % cfg.save_every == 0 and step < cfg.steps:
                    self.save()
        except KeyboardInterrupt:
            # Ctrl-C inside optimizer.step() leaves the weights half updated: keep the last checkpoint then.
            if not self._updating:
                self.save()
            raise
        self.save()
        return {**last, "steps": self.state.step, "skipped_images": self.state.skipped_images,
                "missing_images": self.missing_images, "out": str(self.out)}

    def _log(self, metrics: dict) -> None:
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({**metrics, "time": time.time()}) + "\n")

    # --- saving and resuming -------------------------------------------------------------------

    def save(self) -> None:
        """The checkpoint files (as `DualEncoder.save_pretrained` lays them out) and then the resume state.

        Not `save_pretrained` itself: it swaps in a whole new folder, which would drop the run's
        metrics and resume state.
        """
        self.out.mkdir(parents=True, exist_ok=True)
        weights = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        _atomic_write_text(self.out / "config.json", json.dumps(self.model.config.to_dict(), indent=2) + "\n")
        _atomic_save_tensors(weights, self.out / "model.safetensors")
        tok = Path(self.tokenizer.path)
        if tok.resolve() != (self.out / "tokenizer.model").resolve():  # from a checkpoint: bring its tokenizer
            tmp = self.out / ".tokenizer.model.tmp"
            shutil.copyfile(tok, tmp)
            os.replace(tmp, self.out / "tokenizer.model")
        _atomic_write_text(self.out / "train_config.yaml", self._config_yaml())
        state = {
            "step": self.state.step,
            "skipped_images": self.state.skipped_images,
            "bad_images": sorted(self.bad_images),
            "model": weights,
            "optimizer": self.optimizer.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
            "config": self.cfg.to_dict(),
        }
        tmp = self.out / ".trainer_state.pt.tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.out / "trainer_state.pt")

    def _config_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.cfg.to_dict(), sort_keys=False)

    def _load_state(self, path: Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=False)  # RNG state must stay on the CPU
        saved = state.get("config", {})
        if "objective" not in saved:
            raise PaliGemmaError(f"'{path}' is the state of a captioning run; resume it without --objective")
        defaults = ContrastiveTrainConfig()  # a run saved before a setting existed used its default
        for name in RESUME_FIXED:
            used = saved.get(name, getattr(defaults, name))
            if used != getattr(self.cfg, name):
                raise PaliGemmaError(f"cannot resume '{self.out}' with {name} = {getattr(self.cfg, name)!r}: the run "
                                     f"used {used!r}; start a new run to change it")
        self.model.load_state_dict(state["model"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        self.state.step = state["step"]
        self.state.skipped_images = state["skipped_images"]
        self.bad_images = set(state["bad_images"])
        trim_metrics(self.out, self.state.step)

def run_contrastive_training(settings: dict, resume: bool = False, device: str | torch.device = "cpu",
                             on_log: Callable[[dict], None] | None = None) -> dict:
    """Train a dual encoder from a settings dict (YAML keys or flag names); returns the run summary.

    The summary has the last step's metrics (loss, lr, temperature, bias, ...) plus steps,
    skipped_images, missing_images and out (the checkpoint folder).
    """
    cfg = ContrastiveTrainConfig.from_dict(settings)
    return ContrastiveTrainer(cfg, device=device, on_log=on_log, resume=resume).run()
