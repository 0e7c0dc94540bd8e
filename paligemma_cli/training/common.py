"""What the trainers share: settings, the learning-rate schedule, data order, the run folder and the loop.

A run is reproducible piece by piece: data order is a pure function of (seed, step) (`BatchOrder`) and
the learning rate of the step (`lr_at`), so a resumed run draws the same batches and ends exactly where
an uninterrupted one would. A run folder holds the model checkpoint, `train_config.yaml`,
`metrics.jsonl` and the resume state (`resume_state.py`); each file is replaced atomically. The folder
carries the tool's marker from the start, so a run that failed before its first checkpoint can be
started again in it, and a folder that holds someone else's files is never written into.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import time
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

import torch
import yaml

from paligemma_cli.distributed import World
from paligemma_cli.errors import PaliGemmaError
from paligemma_cli.outputs import atomic_write_text, is_within, mark_folder, marked_kind, resolved, why
from paligemma_cli.processing.image import load_image
from paligemma_cli.training.resume_state import has_state, load_state, save_state

SCHEDULES = ("cosine", "constant")
PRECISIONS = ("auto", "bf16", "fp32")


# --- settings --------------------------------------------------------------------------------------------


def coerce(name: str, value, hint):
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


@dataclass
class RunSettings:
    """The settings of every training run; each trainer's config adds its own and may change defaults."""

    data: str = ""
    out: str = ""
    model: str | None = None  # a checkpoint folder to start from
    model_config: str | None = None  # or a named small config to train from scratch
    steps: int = 1000
    batch_size: int = 16
    lr: float | None = None  # None: the trainer's default for the kind of run
    weight_decay: float = 0.0
    warmup_steps: int = 50
    schedule: str = "cosine"  # cosine | constant
    min_lr_ratio: float = 0.0
    clip: float = 1.0  # gradient-norm clip (0 disables)
    precision: str = "auto"  # auto | bf16 | fp32
    seed: int = 0
    save_every: int = 200
    log_every: int = 10
    max_length: int | None = None
    tokenizer_vocab_size: int = 512  # upper bound for a tokenizer trained from scratch

    # Settings a resumed run must keep, or it would silently train something other than the run it continues.
    resume_fixed: ClassVar[tuple[str, ...]] = ()

    def check_common(self) -> None:
        """The checks every run needs; each trainer's `resolved()` calls it and adds its own."""
        for name in ("lr", "weight_decay", "min_lr_ratio", "clip"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
                raise PaliGemmaError(f"--{name.replace('_', '-')} must be a finite number "
                                     f"{'> 0' if name == 'lr' else '>= 0'}, got {value}")
        if self.min_lr_ratio > 1:
            raise PaliGemmaError(f"min_lr_ratio must be between 0 and 1, got {self.min_lr_ratio}")
        if self.schedule not in SCHEDULES:
            raise PaliGemmaError(f"--schedule must be cosine or constant, got {self.schedule!r}")
        if self.precision not in PRECISIONS:
            raise PaliGemmaError(f"--precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.warmup_steps < 0 or self.log_every < 1 or self.save_every < 1:
            raise PaliGemmaError("--warmup-steps must be at least 0, --log-every and --save-every at least 1")

    @classmethod
    def unknown_settings(cls, names: list[str]) -> PaliGemmaError:
        return PaliGemmaError(f"unknown training setting(s): {', '.join(names)}; "
                              f"known: {', '.join(f.name for f in dataclasses.fields(cls))}")

    @classmethod
    def from_dict(cls, d: dict):
        """Settings from YAML or flags (keys with - or _), checked against the field types."""
        hints = typing.get_type_hints(cls)
        clean = {k.replace("-", "_"): v for k, v in d.items()}
        unknown = sorted(set(clean) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise cls.unknown_settings(unknown)
        return cls(**{k: coerce(k, v, hints[k]) for k, v in clean.items()})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}


def lr_at(step: int, cfg: RunSettings) -> float:
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


def pick_autocast(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    # auto: bf16 on GPUs that have it; on CPU float32, which is faster than emulated bf16 on most chips.
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def adamw(model: torch.nn.Module, cfg: RunSettings) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, weight decay on matrices only (not norms, biases, temperatures)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(
        [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
         {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
    )


# --- the run folder ----------------------------------------------------------------------------------------


RUN_KIND = "training run"


def check_run_folder(out: Path, resume: bool, inputs: list) -> None:
    """Refuse a resume with nothing to resume, a new run over an old one, a run folder that is, holds or
    lies inside one of the run's `inputs`, and one that holds files other than an unfinished run's."""
    if out.exists() and not out.is_dir():
        raise PaliGemmaError(f"--out '{out}' is a file; a run needs a folder")
    target = resolved(out)
    for source in inputs:
        src = resolved(source)
        if is_within(src, target) or is_within(target, src):
            raise PaliGemmaError(f"--out '{out}' is, holds or lies inside the input '{source}'; "
                                 "choose another --out for the run")
    if resume:
        if not has_state(out):
            raise PaliGemmaError(f"nothing to resume in '{out}' (no trainer state); start the run without --resume")
        return
    if has_state(out):
        raise PaliGemmaError(f"'{out}' already holds a run; pass --resume to continue it or choose another --out")
    if out.is_dir() and any(out.iterdir()) and marked_kind(out) != RUN_KIND:
        what = "a model" if (out / "config.json").exists() else "files this tool did not write"
        raise PaliGemmaError(f"'{out}' already holds {what}; choose another --out for the run")


def discard_unfinished_run(out: Path, created: bool) -> None:
    """After a run failed before its first checkpoint: remove what it wrote, so nothing looks usable.
    Only a folder that carries the marker and no state is touched."""
    if not out.is_dir() or has_state(out) or marked_kind(out) != RUN_KIND:
        return
    if created:
        shutil.rmtree(out, ignore_errors=True)
    else:
        for item in out.iterdir():
            shutil.rmtree(item, ignore_errors=True) if item.is_dir() else item.unlink(missing_ok=True)


def trim_metrics(out: Path, step: int) -> None:
    """Drop metrics logged after the checkpoint (a run killed between saves): they are redone."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    keep = [line for line in lines if json.loads(line).get("step", 0) <= step]
    if len(keep) != len(lines):
        atomic_write_text(path, "".join(line + "\n" for line in keep))


def usable_examples(examples: list, data: str) -> tuple[list, int]:
    """(the examples whose image file exists, how many do not); fails before any step when no image at all
    can be read. Reading stops at the first good image, so this is quick."""
    usable = [ex for ex in examples if os.path.exists(ex.image)]
    if not usable:
        raise PaliGemmaError(f"'{data}' has no usable example: none of its image files exists "
                             "(image paths are relative to the JSONL file)")
    for ex in usable:
        try:
            load_image(ex.image)
            break
        except PaliGemmaError:
            continue
    else:
        raise PaliGemmaError(f"'{data}' has no usable example: none of its {len(usable)} images can be read "
                             "(image paths are relative to the JSONL file)")
    return usable, len(examples) - len(usable)


# --- the loop ------------------------------------------------------------------------------------------------


@dataclass
class TrainState:
    step: int = 0
    skipped_images: int = 0


class TrainerBase:
    """The loop, logging and resume state the trainers share. A subclass's `setup()` sets `model`,
    `optimizer`, `examples_per_step` and `missing_images`; it provides `train_step()`, `save()` and
    `load_weights(weights, folder)`. `run()` trains to `cfg.steps`, saving as it goes and on Ctrl-C.

    Under torchrun (`world` of several ranks) every rank builds the same model and reads the same
    resume state; rank 0 alone writes the run folder, and a trainer that can run so provides
    `parallelize()` (wrap the model for DDP or FSDP2), `snapshot()` (the tensors to save, gathered
    whole from the ranks) and `write(snapshot)`.
    """

    examples_per_step: int  # for the examples/s figure

    def __init__(self, cfg: RunSettings, device, on_log: Callable[[dict], None] | None, resume: bool,
                 world: World | None = None):
        self.cfg = cfg
        self.device = torch.device(device)
        self.world = world or World(device=self.device)
        self.on_log = on_log or (lambda m: None)
        self.out = Path(cfg.out)
        self.resuming = resume
        # Every rank checks before rank 0 writes the marker, so none can see a folder half-marked.
        self.world.agree(lambda: check_run_folder(self.out, resume, [
            p for p in (cfg.data, cfg.model, getattr(cfg, "val_data", None), getattr(cfg, "init_vision", None)) if p]))
        self.created_out = not self.out.exists()
        # From here on the folder is this run's: marked (by rank 0) before anything else is written.
        if not resume and self.world.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            mark_folder(self.out, RUN_KIND)
        self.state = TrainState()
        self.saved_step = 0  # the step of the last checkpoint written, for messages
        self.bad_images: set[str] = set()  # unreadable files, skipped without reading them again
        self.autocast = pick_autocast(cfg.precision, self.device)
        self._updating = False  # True while weights and optimizer are part-way through one step
        try:
            self.world.agree(self._prepare)
            if self.world.distributed:
                self.parallelize()
        except BaseException:
            if self.world.is_main:
                discard_unfinished_run(self.out, self.created_out)  # nothing half-made is left to look usable
            raise

    def _prepare(self) -> None:
        self.setup()
        if self.resuming:
            self._load_state()
        elif self.world.is_main:
            atomic_write_text(self.out / "train_config.yaml", self.config_yaml())

    def parallelize(self) -> None:
        """Make the model ready for training on several ranks (each trainer that can)."""
        raise PaliGemmaError(f"{type(self).__name__} runs in one process; launch it without torchrun")

    def setup(self) -> None:
        """Read the data, build the model and the optimizer (each trainer's own)."""
        raise NotImplementedError

    def read_image(self, path):
        """The image at `path`, or None if it cannot be read (each unreadable file counted once)."""
        path = str(path)
        if path in self.bad_images:
            return None
        try:
            return load_image(path)
        except PaliGemmaError:
            self.bad_images.add(path)
            self.state.skipped_images += 1
            return None

    def begin_step(self) -> float:
        """Set this step's learning rate and clear the gradients; returns the learning rate."""
        lr = lr_at(self.state.step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        return lr

    def finish_step(self) -> float:
        """Clip, update and count the step; returns the gradient norm before clipping."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = self.clip_gradients(params) if self.cfg.clip > 0 else torch.tensor(0.0)
        self._updating = True
        self.optimizer.step()
        self.state.step += 1
        self._updating = False
        return float(grad_norm)

    def clip_gradients(self, params: list) -> torch.Tensor:
        """Scale the gradients to a norm of at most `cfg.clip`; returns their norm before."""
        return torch.nn.utils.clip_grad_norm_(params, self.cfg.clip)

    def after_step(self, metrics: dict) -> None:
        """Hook for per-step extras (the captioning trainer's validation loss)."""

    def run(self) -> dict:
        try:
            return self._run()
        except KeyboardInterrupt:
            raise  # saved by `_run` where it could be
        except BaseException:
            if self.world.is_main:
                discard_unfinished_run(self.out, self.created_out)  # failed before its first checkpoint
            raise

    def _run(self) -> dict:
        cfg = self.cfg
        t0, seen, last = time.perf_counter(), 0, {}
        try:
            while self.state.step < cfg.steps:
                metrics = self.train_step()
                seen += self.examples_per_step
                metrics["examples_per_s"] = seen / (time.perf_counter() - t0)
                self.after_step(metrics)
                step = self.state.step
                if step % cfg.log_every == 0 or step == cfg.steps or any(k.startswith("val_") for k in metrics):
                    self._log(metrics)
                self.on_log(metrics)
                last = metrics
                if step % cfg.save_every == 0 and step < cfg.steps:
                    self.checkpoint()
        except KeyboardInterrupt:
            # Ctrl-C inside optimizer.step() leaves some weights updated and some not: keep the last
            # checkpoint then. Anywhere else the weights are those of a finished step. Ranks of a torchrun
            # job are stopped each at its own moment, so none can count on the others to save with it:
            # the last checkpoint stays.
            if not self._updating and not self.world.distributed:
                self.checkpoint()
            raise
        self.checkpoint()
        return {**last, "steps": self.state.step, "skipped_images": self.state.skipped_images,
                "missing_images": self.missing_images, "out": str(self.out)}

    def _log(self, metrics: dict) -> None:
        if not self.world.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({**metrics, "time": time.time()}) + "\n")

    def config_yaml(self) -> str:
        return yaml.safe_dump(self.cfg.to_dict(), sort_keys=False)

    # --- resume state ------------------------------------------------------------------------------------

    def save_resume_state(self, weights: dict[str, torch.Tensor], optimizer: dict | None = None) -> None:
        """Write what `--resume` needs beside the checkpoint: `weights` (those the run trains), the
        optimizer (its `state_dict()`, unless given whole from the ranks), the RNG states, the step and
        the settings."""
        info = {"skipped_images": self.state.skipped_images, "bad_images": sorted(self.bad_images),
                "config": self.cfg.to_dict()}
        save_state(self.out, self.state.step, weights, optimizer or self.optimizer.state_dict(), info)
        self.saved_step = self.state.step

    def checkpoint(self) -> None:
        """`save()`, whose failure (a full disk) is one line saying which step the folder still holds.
        Under torchrun every rank gathers its share and rank 0 writes; a failed write stops every rank."""
        if self.world.distributed:
            self._merge_bad_images()
            snapshot = self.snapshot()
            self.world.agree(lambda: self._saving(lambda: self.write(snapshot)), main_only=True)
            self.saved_step = self.state.step
            return
        self._saving(self.save)

    def _saving(self, save: Callable[[], None]) -> None:
        try:
            save()
        except OSError as e:
            kept = f"step {self.saved_step}" if has_state(self.out) else "no checkpoint yet"
            raise PaliGemmaError(f"could not save step {self.state.step} to '{self.out}': {why(e)}; "
                                 f"the run folder keeps {kept}") from None

    def _merge_bad_images(self) -> None:
        """Every rank learns the unreadable files the others met; each counts once in the run's total."""
        merged = set().union(*self.world.gather(sorted(self.bad_images)))
        self.bad_images = merged
        self.state.skipped_images = len(merged)

    def snapshot(self) -> dict:
        """What `write` saves, whole on rank 0 (every rank takes part in gathering it)."""
        raise NotImplementedError

    def write(self, snapshot: dict) -> None:
        raise NotImplementedError

    def check_saved_settings(self, saved: dict) -> None:
        """Refuse to resume with a setting that decides what is trained changed from the saved run's."""
        defaults = type(self.cfg)()  # a run saved before a setting existed used its default
        for name in self.cfg.resume_fixed:
            used = saved.get(name, getattr(defaults, name))
            if used != getattr(self.cfg, name):
                raise PaliGemmaError(f"cannot resume '{self.out}' with {name} = {getattr(self.cfg, name)!r}: the run "
                                     f"used {used!r}; start a new run to change it")

    def _load_state(self) -> None:
        state = load_state(self.out)
        self.check_saved_settings(state.get("config", {}))
        self.load_weights(state["model"], self.out)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng_torch"])
            random.setstate(state["python_rng"])
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise PaliGemmaError(f"the trainer state in '{self.out}' does not fit this run ({e}); "
                                 "start a new run") from None
        self.state.step = self.saved_step = state["step"]
        self.state.skipped_images = state["skipped_images"]
        self.bad_images = set(state.get("bad_images", []))  # absent in states saved before it was kept
        if self.world.is_main:
            trim_metrics(self.out, self.state.step)
