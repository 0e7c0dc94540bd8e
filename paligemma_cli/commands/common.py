"""What the commands share: loading a model with feedback on stderr, sampling options, stdout output.

Model text goes to stdout, everything else to stderr (as `llm` does), so `paligemma ask … > out.txt`
captures only the answer. torch and the model code are imported inside the functions, so that a
command's module (and `paligemma --help`) loads without them.
"""

from __future__ import annotations

import glob
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

# Jobs of at least this many answers get the fast weight layout: it costs seconds once and pays back
# after a few dozen tokens (docs/speed.md).
FAST_LAYOUT_MIN_JOBS = 4
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".ppm", ".pgm"}


def stderr_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def loading(console, what):
    """A spinner on stderr while `what` loads, where stderr is a terminal."""
    return console.status(f"loading {what}") if console.is_terminal else nullcontext()


def load_pipeline(model: str | None, device: str, dtype: str, console=None, quantize: str = "none",
                  compile: bool = False, fast_layout: bool = False):
    """The pipeline of `model` (a folder, a hub id already downloaded, or the demo model). `fast_layout`
    for jobs that decode a lot (see `Pipeline.load`); `--compile` implies it."""
    import torch

    from paligemma_cli.inference.pipeline import Pipeline
    from paligemma_cli.settings import resolve_model
    from paligemma_cli.speed.quantize import is_quantized

    folder = resolve_model(model)
    console = console or stderr_console()
    with loading(console, folder):
        pipe = Pipeline.load(folder, device, dtype, quantize, fast_layout or compile)
    if is_quantized(pipe.model) and not (pipe.model.device.type == "cpu"
                                         and pipe.model.dtype in (torch.float32, torch.bfloat16)):
        console.print(f"note: no fast int8 kernel for {str(pipe.model.dtype).removeprefix('torch.')} on "
                      f"{pipe.model.device.type}: int8 weights are converted to it at every step, which saves "
                      "memory but is slower than without --quantize", markup=False)
    if compile:
        pipe.compile()
    return pipe


def load_dual_encoder(spec: str | None, device: str = "auto", dtype: str = "auto", console=None):
    """(model, tokenizer, folder) for a SigLIP dual encoder named like any `--model` (folder or cached Hub id)."""
    from paligemma_cli.checkpoints import hf
    from paligemma_cli.device import pick_device, pick_dtype
    from paligemma_cli.errors import PaliGemmaError
    from paligemma_cli.processing.siglip_tokenizer import SiglipTokenizer
    from paligemma_cli.settings import resolve_model

    if not spec:
        # The default model is a PaliGemma, which has no text tower to compare against.
        raise PaliGemmaError("this needs a SigLIP dual encoder: pass --model, e.g. a run folder of "
                             "`paligemma train --objective siglip`")
    folder = resolve_model(spec)
    dev = pick_device(device)
    with loading(console or stderr_console(), spec):
        model = hf.load_dual_encoder(folder, dtype=pick_dtype(dtype, dev), device=dev)
    return model, SiglipTokenizer.from_folder(folder, model.config.text), folder


def sampling_options(max_tokens: int, temperature: float = 0.0, top_k=None, top_p=None, seed=None):
    from paligemma_cli.inference.generate import SamplingOptions

    return SamplingOptions(max_new_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                           seed=seed).validate()


def write_stdout(text: str) -> None:
    """Raw model text to stdout, flushed at once (never through Rich markup: a model may print `[red]`)."""
    sys.stdout.write(text)
    sys.stdout.flush()


def find_images(paths: list[str], recursive: bool) -> list[str]:
    """Expand files, folders and globs into a sorted list of image paths (as strings), without repeats."""
    found: list[str] = []
    for spec in paths:
        p = Path(spec)
        if p.is_dir():
            pattern = "**/*" if recursive else "*"
            found += sorted(str(f) for f in p.glob(pattern) if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        elif p.exists():
            found.append(spec)
        else:
            matches = sorted(glob.glob(spec, recursive=recursive))
            if not matches and not glob.has_magic(spec):
                found.append(spec)  # a named file that is missing: reported as unreadable, not dropped silently
            found += [m for m in matches if Path(m).is_file()]
    seen, unique = set(), []
    for f in found:
        if f not in seen:
            seen.add(f)
            unique.append(f)
    return unique


def each_batch_of_images(names: list[str], batch_size: int, console, label: str,
                         handle: Callable[[list[str], list], int]) -> list[str]:
    """Read `names` in batches of `batch_size` under a progress bar on `console` and call
    `handle(readable names, their PIL images)` per batch, which returns how many it finished (for the
    rate shown). An image that cannot be read is reported and skipped. Returns the unreadable names."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from paligemma_cli.errors import PaliGemmaError
    from paligemma_cli.processing.image import load_image

    failed, done, t0 = [], 0, time.perf_counter()
    progress = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                        TimeRemainingColumn(), console=console)
    with progress:
        task = progress.add_task(label, total=len(names), rate="")
        for start in range(0, len(names), batch_size):
            chunk = names[start:start + batch_size]
            loaded, readable = [], []
            for name in chunk:
                try:
                    loaded.append(load_image(name))
                    readable.append(name)
                except PaliGemmaError as e:
                    failed.append(name)
                    progress.console.print(f"skipped: {e}", markup=False)
            if loaded:
                done += handle(readable, loaded)
            progress.update(task, advance=len(chunk), rate=f"{done / (time.perf_counter() - t0):.2f} img/s")
    return failed
