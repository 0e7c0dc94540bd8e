"""A run's settings from their three sources, and the trainer they ask for.

Precedence: flags over the `--config` YAML file; with `--resume` and no data given, the settings the run
saved (`train_config.yaml`) fill in what neither names. `objective` picks the trainer: captioning
(PaliGemma, `paligemma.py`), siglip / clip (a dual encoder, `contrastive.py`) or vqvae (the mask
tokenizer of `segment`, `vqvae.py`).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from paligemma_cli.distributed import World
from paligemma_cli.errors import PaliGemmaError
from paligemma_cli.training.contrastive import CONTRASTIVE_OBJECTIVES, ContrastiveTrainConfig, ContrastiveTrainer
from paligemma_cli.training.paligemma import TrainConfig, Trainer
from paligemma_cli.training.vqvae import VQVAETrainConfig, VQVAETrainer

OBJECTIVES = ("captioning", *CONTRASTIVE_OBJECTIVES, "vqvae")


def read_yaml(path: Path) -> dict:
    """The settings mapping of a YAML file, keys with - or _."""
    try:
        settings = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise PaliGemmaError(f"config file '{path}' does not exist") from None
    except yaml.YAMLError as e:
        raise PaliGemmaError(f"'{path}' is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(settings, dict):
        raise PaliGemmaError(f"'{path}' must hold a mapping of settings")
    return {k.replace("-", "_"): v for k, v in settings.items()}


def merge_settings(config: Path | None, flags: dict, objective: str | None, resume: bool) -> tuple[str, dict]:
    """(objective, settings) from the YAML file, the flags given (None = not given) and, when resuming
    with no data named, the run's saved settings."""
    settings: dict = {}
    if config is not None:
        settings = read_yaml(config)
        unknown = sorted(set(settings) - TrainConfig.field_names() - {"objective"})
        if unknown and (objective or settings.get("objective")) not in (*CONTRASTIVE_OBJECTIVES, "vqvae"):  # those check their own
            raise PaliGemmaError(f"'{config}': unknown setting(s) {', '.join(unknown)}; "
                                 f"see `paligemma train --help` for the settings")
    for key, value in flags.items():
        if value is not None:
            settings[key] = str(value) if isinstance(value, Path) else value
    if resume and not settings.get("data") and settings.get("out"):
        # `--resume` alone continues with the settings the run saved.
        saved = Path(settings["out"], "train_config.yaml")
        if saved.exists():
            settings = {**read_yaml(saved), **settings}
    if not settings.get("data"):
        raise PaliGemmaError("no training data: give a JSONL file (or `data:` in --config)")
    if not settings.get("out"):
        raise PaliGemmaError("no run folder: pass --out (or `out:` in --config)")
    saved_objective = settings.pop("objective", None)  # from --config, or the run being resumed
    objective = objective or saved_objective or "captioning"
    if objective not in OBJECTIVES:
        raise PaliGemmaError(f"--objective must be captioning, siglip, clip or vqvae, got {objective!r}")
    return objective, settings


def make_trainer(objective: str, settings: dict, device, resume: bool, world: World | None = None,
                 sharding: str = "ddp") -> Trainer | ContrastiveTrainer | VQVAETrainer:
    """The trainer for `objective`, set up (data read, model built, resumed if asked) and ready to `run()`;
    on a `world` of several ranks (torchrun), data-parallel with `sharding` (ddp or fsdp)."""
    if objective == "vqvae":
        if world is not None and world.distributed:
            raise PaliGemmaError("--objective vqvae trains in one process; launch it without torchrun")
        return VQVAETrainer(VQVAETrainConfig.from_dict({**settings, "objective": objective}), device=device,
                            resume=resume)
    if objective in CONTRASTIVE_OBJECTIVES:
        if world is not None and world.distributed:
            # Its loss compares every image with every caption of the batch: split over ranks it would
            # need the features gathered across them, which this trainer does not do.
            raise PaliGemmaError(f"--objective {objective} trains in one process; launch it without torchrun")
        cfg = ContrastiveTrainConfig.from_dict({**settings, "objective": objective})
        return ContrastiveTrainer(cfg, device=device, resume=resume)
    return Trainer(TrainConfig.from_dict(settings), device=device, resume=resume, world=world, sharding=sharding)
