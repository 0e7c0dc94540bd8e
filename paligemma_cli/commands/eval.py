"""`paligemma eval DATA.jsonl`: answer every example of a dataset and report scores per task.

Only typer and the standard library are imported at the top, so `paligemma --help` stays instant.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from paligemma_cli.options import CompileOpt, DeviceOpt, DtypeOpt, JsonOpt, MaxTokensOpt, ModelOpt, QuantizeOpt

# Column headings for the metric keys of evaluation.evaluate.METRICS.
_HEADINGS = {"exact_match": "exact", "vqa_accuracy": "VQA acc", "bleu4": "BLEU-4", "cider": "CIDEr",
             "accuracy": "det acc", "precision": "P@.5", "recall": "R@.5", "mean_iou": "mIoU",
             "miou": "mask mIoU", "boxacc": "box@.5", "invalid": "invalid"}


def eval_command(
    data: Annotated[Path, typer.Argument(metavar="DATA.jsonl", help="Dataset: one {image, prefix, suffix[, task]} per line.", show_default=False)],
    model: ModelOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Examples per forward pass.")] = 16,
    limit: Annotated[Optional[int], typer.Option("--limit", "-n", min=1, help="Evaluate only the first N examples (after --task).")] = None,
    tasks: Annotated[Optional[list[str]], typer.Option("--task", "-t", help="Only this task (repeat for several), e.g. color; `retrieval` scores a SigLIP dual encoder (recall@1/5) on the caption lines.")] = None,
    predictions: Annotated[Optional[Path], typer.Option("--predictions", help="Write every example's prediction and score to this JSONL file as they are made.")] = None,
    json_out: JsonOpt = False,
    max_tokens: MaxTokensOpt = 64,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = "none",
    compile: CompileOpt = False,
    vae: Annotated[Optional[str], typer.Option("--vae", help="For `segment` lines: the VQ-VAE that decodes masks (default: as `segment` finds it).", show_default=False)] = None,
) -> None:
    """Score a model on a dataset, per task: exact match and VQA accuracy for `answer` prompts,
    BLEU-4 and CIDEr-D for captions, precision/recall at IoU 0.5 for `detect`, and for `segment`
    big_vision's mean per-example mask IoU, box accuracy at IoU 0.5 and the share of invalid answers.
    Scores are percentages.

    Examples:

      paligemma eval data/shapes-test/data.jsonl --limit 500

      paligemma eval data/shapes-test/data.jsonl --task color --task count --json

      paligemma eval val.jsonl --model runs/shapes/final --predictions preds.jsonl

      paligemma eval data/shapes-test/data.jsonl --task retrieval --model runs/siglip

      torchrun --nproc-per-node 4 -m paligemma_cli eval val.jsonl --model runs/shapes --json

      paligemma eval data/shapes-segment-test/data.jsonl --task segment
    """
    from paligemma_cli.commands.common import FAST_LAYOUT_MIN_JOBS, load_pipeline, sampling_options, stderr_console
    from paligemma_cli.data.jsonl import read_jsonl
    from paligemma_cli.distributed import torchrun_world
    from paligemma_cli.errors import PaliGemmaError
    from paligemma_cli.evaluation.evaluate import select_examples
    from paligemma_cli.outputs import check_output_file, open_output

    world = torchrun_world(device)
    if world is not None:
        try:
            return eval_on_ranks(world, data, model, batch_size, limit, tasks, predictions, json_out, max_tokens,
                                 dtype, quantize, compile, vae)
        finally:
            world.close()
    console = stderr_console()
    if tasks and "retrieval" in tasks:
        if len(tasks) > 1 or predictions:
            raise PaliGemmaError("--task retrieval scores a dual encoder alone: drop the other --task and --predictions")
        if quantize.lower() != "none" or compile:
            raise PaliGemmaError("--quantize and --compile apply to PaliGemma models; --task retrieval scores a "
                                 "SigLIP dual encoder")
        result = retrieval_eval(data, model, batch_size, limit, device, dtype)
        console.print(f"evaluated {result['n']} image-caption pair(s) in {result['seconds']:.1f}s", markup=False)
        print(json.dumps(result) if json_out else format_retrieval(result))
        return
    examples = select_examples(read_jsonl(data), tasks or (), limit)
    if not examples:
        raise PaliGemmaError(f"{data}: no examples to evaluate")
    if predictions is not None:
        predictions = check_output_file(predictions, [data, *(e.image for e in examples)], "--predictions")
    opts = sampling_options(max_tokens)  # greedy: scores should not depend on a seed
    codec = segment_codec(examples, vae, model)
    pipe = load_pipeline(model, device, dtype, console, quantize=quantize, compile=compile,
                         fast_layout=len(examples) >= FAST_LAYOUT_MIN_JOBS)

    out = open_output(predictions, "w", encoding="utf-8") if predictions else None
    try:
        report = evaluate_with_progress(pipe, examples, opts, batch_size, codec, console, "eval", out)
    finally:
        if out is not None:
            out.close()

    show_report(report, console, pipe.folder, data, predictions, json_out)


def evaluate_with_progress(pipe, examples, opts, batch_size: int, codec, console, label: str, out=None):
    """`evaluate` under a progress bar; skipped examples reported as they come, and each example's record
    written to `out` (the --predictions file) as soon as its batch is scored."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from paligemma_cli.evaluation.evaluate import evaluate

    progress = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console)
    with progress:
        bar = progress.add_task("eval", total=len(examples))

        def on_progress(batch):
            for item in batch:
                if item.error is not None:
                    progress.console.print(f"skipped: {item.error}", markup=False)
                if out is not None:
                    out.write(json.dumps(item.as_record(), ensure_ascii=False) + "\n")
            if out is not None:
                out.flush()  # an interrupted run keeps what it has scored
            progress.advance(bar, len(batch))

        return evaluate(pipe, examples, opts, batch_size, on_progress, codec)


def segment_codec(examples, vae: str | None, model: str | None):
    """The MaskCodec that decodes `segment` answers, or None when no example is a segment prompt."""
    from paligemma_cli.evaluation.evaluate import SEGMENT, task_kind

    if not any(task_kind(e.prefix) == SEGMENT for e in examples):
        return None
    from paligemma_cli.inference.segmentation import MaskCodec
    from paligemma_cli.settings import resolve_model, resolve_vae

    return MaskCodec.load(resolve_vae(vae, resolve_model(model)))


def show_report(report, console, folder, data: Path, predictions: Path | None, json_out: bool) -> None:
    """The scores on stdout (a table, or JSON), the counts on stderr."""
    from paligemma_cli.errors import PaliGemmaError

    skipped = len(report.skipped)
    if report.n == 0:
        raise PaliGemmaError(f"{data}: no usable example; all {skipped} image(s) were unreadable")
    console.print(f"evaluated {report.n} example(s) in {report.seconds:.1f}s"
                  + (f"; {skipped} skipped (unreadable image)" if skipped else ""), markup=False)
    if predictions:
        console.print(f"wrote {predictions}", markup=False)

    if json_out:
        print(json.dumps({
            "model": str(folder), "data": str(data), "n": report.n,
            "tasks": {name: {**{k: round(v, 2) for k, v in t.metrics.items()}, "n": t.n}
                      for name, t in report.tasks.items()},
            "skipped": skipped,
        }))
        return
    print_table(report)


def eval_on_ranks(world, data: Path, model, batch_size: int, limit, tasks, predictions: Path | None, json_out: bool,
                  max_tokens: int, dtype: str, quantize: str, compile: bool, vae: str | None = None) -> None:
    """`eval` as one rank of a torchrun job: each rank answers its contiguous share of the examples; rank 0
    gathers every answer, in input order, and scores the tasks over all of them (corpus metrics such as
    CIDEr-D cannot be averaged from per-rank scores), then writes --predictions and prints as one
    process would."""
    import time

    from rich.console import Console

    from paligemma_cli.commands.common import FAST_LAYOUT_MIN_JOBS, load_pipeline, sampling_options
    from paligemma_cli.data.jsonl import read_jsonl
    from paligemma_cli.errors import PaliGemmaError
    from paligemma_cli.evaluation.evaluate import report_of, select_examples
    from paligemma_cli.outputs import atomic_write_text, check_output_file

    console = Console(stderr=True, highlight=False, quiet=not world.is_main)

    def inputs():
        if tasks and "retrieval" in tasks:
            raise PaliGemmaError("--task retrieval runs in one process; launch it without torchrun")
        examples = select_examples(read_jsonl(data), tasks or (), limit)
        if not examples:
            raise PaliGemmaError(f"{data}: no examples to evaluate")
        if len(examples) < world.size:
            raise PaliGemmaError(f"{len(examples)} example(s) for {world.size} processes: launch at most {len(examples)}")
        path = check_output_file(predictions, [data, *(e.image for e in examples)], "--predictions") if predictions else None
        return examples, path

    examples, predictions = world.agree(inputs)
    codec = world.agree(lambda: segment_codec(examples, vae, model))
    mine = list(world.shard(examples))
    opts = sampling_options(max_tokens)  # greedy: scores should not depend on a seed
    pipe = world.agree(lambda: load_pipeline(model, str(world.device), dtype, console, quantize=quantize,
                                             compile=compile, fast_layout=len(mine) >= FAST_LAYOUT_MIN_JOBS))
    t0 = time.perf_counter()
    answered = evaluate_with_progress(pipe, mine, opts, batch_size, codec, console,
                                      f"eval (rank 0 of {world.size})").examples
    shares = world.gather(answered)  # contiguous shares in rank order: the input order
    if not world.is_main:
        return
    report = report_of([item for share in shares for item in share], time.perf_counter() - t0, codec)
    if predictions:
        atomic_write_text(predictions, "".join(json.dumps(item.as_record(), ensure_ascii=False) + "\n"
                                               for item in report.examples))
    show_report(report, console, pipe.folder, data, predictions, json_out)


def retrieval_eval(data: Path, model: str | None, batch_size: int, limit: int | None, device: str,
                   dtype: str) -> dict:
    """`--task retrieval`: recall@1/5 of a dual encoder on the caption lines, as a JSON-ready dict (model,
    data, n, image_to_text / text_to_image {"r1", "r5"} in percent, skipped, seconds)."""
    from paligemma_cli.commands.common import load_dual_encoder
    from paligemma_cli.data.jsonl import caption_examples, read_jsonl
    from paligemma_cli.errors import PaliGemmaError
    from paligemma_cli.evaluation.retrieval import evaluate_retrieval

    examples = caption_examples(read_jsonl(data))[:limit]
    if not examples:
        raise PaliGemmaError(f"{data}: no caption lines to evaluate (lines with task \"caption\" or no task)")
    encoder, tokenizer, folder = load_dual_encoder(model, device, dtype)
    report = evaluate_retrieval(encoder, tokenizer, examples, batch_size)
    return {"model": str(folder), "data": str(data), **report.as_dict(), "seconds": round(report.seconds, 2)}


def format_retrieval(result: dict) -> str:
    """Two lines for a terminal: `image->text  R@1 42.00  R@5 80.00`, then text->image."""
    lines = []
    for name, key in (("image->text", "image_to_text"), ("text->image", "text_to_image")):
        lines.append(f"{name}  " + "  ".join(f"R@{k[1:]} {v:.2f}" for k, v in result[key].items()))
    return "\n".join(lines)


def print_table(report) -> None:
    """One row per task, one column per metric any task has (others blank), on stdout."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from paligemma_cli.evaluation.evaluate import METRICS

    columns = [m for m in METRICS if any(m in t.metrics for t in report.tasks.values())]
    table = Table(show_edge=False)
    table.add_column("task", no_wrap=True)
    table.add_column("n", justify="right")
    for m in columns:
        table.add_column(_HEADINGS[m], justify="right")
    for name, t in report.tasks.items():
        # Text(): task names come from the dataset and must not be read as Rich markup.
        table.add_row(Text(name), str(t.n), *(f"{t.metrics[m]:.2f}" if m in t.metrics else "" for m in columns))
    # Piped output has no terminal width; 120 columns keep every metric readable.
    console = Console(file=sys.stdout, highlight=False)
    if not console.is_terminal:
        console.width = 120
    console.print(table)
