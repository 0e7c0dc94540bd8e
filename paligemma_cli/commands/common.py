"""What the inference commands share: loading the pipeline with feedback on stderr, and stderr output.

Model text goes to stdout, everything else to stderr (as `llm` does), so `paligemma ask … > out.txt`
captures only the answer.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext


def stderr_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


# Re-laying the weights out (`Pipeline.load(fast_layout=True)`) costs 3-5 s on PaliGemma 3B and saves
# ~0.14 s per decoded token in bf16: it pays back after 25-40 tokens, i.e. a few captions or answers.
FAST_LAYOUT_MIN_JOBS = 4


def load_pipeline(model: str | None, device: str, dtype: str, console=None, quantize: str = "none",
                  compile: bool = False, fast_layout: bool = False):
    """The pipeline of `model` (a folder, a hub id already downloaded, or the demo model). `fast_layout`
    for jobs that decode a lot (see `Pipeline.load`); `--compile` implies it."""
    from paligemma_cli.settings import resolve_model
    from paligemma_cli.inference.pipeline import Pipeline

    folder = resolve_model(model)
    console = console or stderr_console()
    with console.status(f"loading {folder}") if console.is_terminal else nullcontext():
        pipe = Pipeline.load(folder, device, dtype, quantize, fast_layout or compile)
    if _int8_in_float32_on_cpu(pipe.model):
        console.print("note: int8 weights with float32 activations save memory but decode slower than float32 "
                      "on a CPU; the fast int8 kernel is bf16's (--dtype bf16)", markup=False)
    if compile:
        pipe.model.compile_decode()
    return pipe


def _int8_in_float32_on_cpu(model) -> bool:
    import torch

    from paligemma_cli.speed.quantize import is_quantized

    return is_quantized(model) and model.device.type == "cpu" and model.dtype == torch.float32


def sampling_options(max_tokens: int, temperature: float = 0.0, top_k=None, top_p=None, seed=None):
    from paligemma_cli.inference.generate import SamplingOptions

    return SamplingOptions(max_new_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                           seed=seed).validate()


def write_stdout(text: str) -> None:
    """Raw model text to stdout, flushed at once (never through Rich markup: a model may print `[red]`)."""
    sys.stdout.write(text)
    sys.stdout.flush()
