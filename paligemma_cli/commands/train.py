"""`paligemma train`: fine-tune a checkpoint, or train a small model from scratch, on a JSONL dataset."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from paligemma_cli.options import DeviceOpt, JsonOpt


def train(
    data: Annotated[Optional[Path], typer.Argument(help="Training JSONL: {\"image\", \"prefix\", \"suffix\"} per line.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run folder: the model checkpoint, metrics.jsonl, resume state.")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML file with any of these settings; flags override it.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Checkpoint folder to fine-tune (with --objective vqvae: a vae-oid.npz).")] = None,
    model_config: Annotated[Optional[str], typer.Option("--model-config", help="Named config to train from scratch, e.g. demo-64 (siglip-demo-64 with --objective siglip).")] = None,
    objective: Annotated[Optional[str], typer.Option("--objective", help="captioning (PaliGemma, the default); siglip / clip: a SigLIP dual encoder on the caption lines; vqvae: the VQ-VAE that `segment` decodes masks with, on the lines' mask images.")] = None,
    val_data: Annotated[Optional[Path], typer.Option("--val-data", help="Validation JSONL for periodic eval loss.")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", min=1, help="Optimizer steps.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", min=1)] = None,
    grad_accum: Annotated[Optional[int], typer.Option("--grad-accum", min=1, help="Micro-batches per step.")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate (default 1e-4 LoRA, 2e-5 full, 1e-3 from scratch).")] = None,
    weight_decay: Annotated[Optional[float], typer.Option("--weight-decay")] = None,
    warmup_steps: Annotated[Optional[int], typer.Option("--warmup-steps")] = None,
    schedule: Annotated[Optional[str], typer.Option("--schedule", help="cosine or constant.")] = None,
    clip: Annotated[Optional[float], typer.Option("--clip", help="Gradient-norm clip (0 disables).")] = None,
    trainable: Annotated[Optional[str], typer.Option("--trainable", help="all, decoder, attention or lora (default lora for a checkpoint, all from scratch).")] = None,
    lora_r: Annotated[Optional[int], typer.Option("--lora-r")] = None,
    lora_alpha: Annotated[Optional[float], typer.Option("--lora-alpha")] = None,
    lora_save: Annotated[Optional[str], typer.Option("--lora-save", help="merged (a full model folder) or adapter.")] = None,
    precision: Annotated[Optional[str], typer.Option("--precision", help="auto (bf16 autocast on GPUs that have it), bf16 or fp32.")] = None,
    gradient_checkpointing: Annotated[Optional[bool], typer.Option("--gradient-checkpointing/--no-gradient-checkpointing")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed")] = None,
    eval_every: Annotated[Optional[int], typer.Option("--eval-every", help="Steps between validation losses (0: never).")] = None,
    save_every: Annotated[Optional[int], typer.Option("--save-every", help="Steps between checkpoints.")] = None,
    log_every: Annotated[Optional[int], typer.Option("--log-every", help="Steps between lines in metrics.jsonl (and on a non-terminal stderr).")] = None,
    max_length: Annotated[Optional[int], typer.Option("--max-length", min=2, help="Tokens per example: image + prompt + answer (a longer example stops the run with an error), or with --objective siglip/clip the text positions of a model trained from scratch. Default: the model's limit.")] = None,
    init_vision: Annotated[Optional[str], typer.Option("--init-vision", help="Start the vision tower from this checkpoint (e.g. a SigLIP trained with --objective siglip).")] = None,
    hard_negatives: Annotated[Optional[int], typer.Option("--hard-negatives", min=0, help="With --objective siglip/clip: per image and step, up to this many of its line's \"negatives\" (wrong captions, e.g. its shapes in another order) join the batch as extra negatives. Default 0.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out where it stopped.")] = False,
    sharding: Annotated[str, typer.Option("--sharding", help="Under torchrun: ddp (each rank holds the whole model) or fsdp (parameters, gradients and optimizer state sharded over the ranks with FSDP2). --batch-size stays the global batch.")] = "ddp",
    device: DeviceOpt = "auto",
    json_out: JsonOpt = False,
) -> None:
    """Fine-tune PaliGemma on your data, or train a small one from scratch.

    Examples:

      paligemma train data/train.jsonl --model ./paligemma2-3b-pt-224 --out runs/mine

      paligemma train --config configs/demo.yaml --out runs/demo

      paligemma train --config configs/demo.yaml --out runs/demo --resume

      paligemma train data/shapes/data.jsonl --objective siglip --model-config siglip-demo-64 --out runs/siglip

      paligemma train data/captions/data.jsonl --objective siglip --model-config siglip-demo-64 --hard-negatives 2 --out runs/siglip

      paligemma train data/shapes-masks/data.jsonl --objective vqvae --steps 2000 --out runs/vqvae

      torchrun --nproc-per-node 4 -m paligemma_cli train data/train.jsonl --model ./paligemma2-10b-pt-224 --sharding fsdp --out runs/big
    """
    from paligemma_cli.distributed import torchrun_world

    flags = dict(data=data, out=out, model=model, model_config=model_config, val_data=val_data, steps=steps,
                 batch_size=batch_size, grad_accum=grad_accum, lr=lr, weight_decay=weight_decay,
                 warmup_steps=warmup_steps, schedule=schedule, clip=clip, trainable=trainable, lora_r=lora_r,
                 lora_alpha=lora_alpha, lora_save=lora_save, precision=precision,
                 gradient_checkpointing=gradient_checkpointing, seed=seed, eval_every=eval_every,
                 save_every=save_every, log_every=log_every, init_vision=init_vision,
                 max_length=max_length, hard_negatives=hard_negatives)
    world = torchrun_world(device)
    try:
        _train(world, device, flags, config, objective, resume, sharding, json_out)
    finally:
        if world is not None:
            world.close()


def _train(world, device: str, flags: dict, config, objective, resume: bool, sharding: str, json_out: bool) -> None:
    """The run on this process: one process, or (`world`) one rank of a torchrun job, where every rank
    trains and rank 0 alone reports."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from paligemma_cli.device import pick_device
    from paligemma_cli.distributed import SHARDINGS, World
    from paligemma_cli.errors import PaliGemmaError
    from paligemma_cli.training.settings import make_trainer, merge_settings

    def settings_of_the_run():
        if sharding not in SHARDINGS:
            raise PaliGemmaError(f"--sharding must be ddp or fsdp, got {sharding!r}")
        return merge_settings(config, flags, objective, resume)

    if world is None:
        objective, settings = settings_of_the_run()
        world = World(device=pick_device(device))
    else:
        objective, settings = world.agree(settings_of_the_run)
    trainer = make_trainer(objective, settings, world.device, resume, world=world, sharding=sharding)
    cfg = trainer.cfg
    console = Console(stderr=True, quiet=not world.is_main)
    total = trainer.cfg.steps
    progress = Progress(
        TextColumn("[bold]train[/]"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console, transient=False,
    )
    # Rich draws a live bar only on a terminal; in a log file it would show nothing until the end,
    # so there a plain line every log_every steps (and at each eval) tells how the run goes.
    live = console.is_terminal
    with progress if live else contextlib.nullcontext():
        task = progress.add_task("train", total=total, completed=trainer.state.step, info="") if live else None

        def on_log(m: dict) -> None:
            info = f"loss {m['loss']:.4f}  lr {m['lr']:.2e}  {m['examples_per_s']:.1f} ex/s"
            if "val_loss" in m:
                info += f"  val {m['val_loss']:.4f}"
            if "iou" in m:  # the VQ-VAE's reconstructions
                info += f"  iou {m['iou']:.3f}" + (f"  val iou {m['val_iou']:.3f}" if "val_iou" in m else "")
            if live:
                progress.update(task, completed=m["step"], info=info)
            elif m["step"] % trainer.cfg.log_every == 0 or m["step"] == total or "val_loss" in m or "val_iou" in m:
                console.print(f"step {m['step']}/{total}  {info}", highlight=False, soft_wrap=True)

        trainer.on_log = on_log
        try:
            with _sigterm_as_interrupt():
                summary = trainer.run()
        except KeyboardInterrupt:
            saved = trainer.saved_step
            if world.distributed:
                console.print(f"interrupted: {cfg.out} keeps step {saved}; continue with --resume" if saved
                              else "interrupted before the first checkpoint: nothing saved")
            else:
                console.print(f"interrupted: saved step {saved} to {cfg.out}; continue with --resume" if saved
                              else "interrupted before the first checkpoint: nothing saved")
            raise typer.Exit(130)
    if not world.is_main:
        return
    if json_out:
        print(json.dumps(summary))
    else:
        skipped = summary["skipped_images"] + summary["missing_images"]
        console.print(f"trained {summary['steps']} steps, final loss {summary.get('loss', float('nan')):.4f}"
                      + (f", {skipped} unreadable image(s) skipped" if skipped else ""))
        print(summary["out"])


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """`kill` (and a job started in the background, where Ctrl-C's SIGINT is ignored) saves like Ctrl-C."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
