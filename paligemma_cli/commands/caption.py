"""`paligemma caption PATH...`: caption files, folders and globs, one record per image as it is made."""

from __future__ import annotations

import csv
import io
import json
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from paligemma_cli.options import CompileOpt, DeviceOpt, DtypeOpt, MaxTokensOpt, ModelOpt, QuantizeOpt


class Format(str, Enum):
    jsonl = "jsonl"
    csv = "csv"
    txt = "txt"


def caption(
    paths: Annotated[list[str], typer.Argument(help="Image files, folders or glob patterns.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write records here (default: stdout).")] = None,
    fmt: Annotated[Format, typer.Option("--format", "-f", help="jsonl, csv or txt (path<TAB>caption).")] = Format.jsonl,
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="Descend into sub-folders.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Skip images already in --out and append.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per forward pass.")] = 8,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="PaliGemma prefix to send.")] = "caption en",
    model: ModelOpt = None,
    max_tokens: MaxTokensOpt = 64,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = "none",
    compile: CompileOpt = False,
) -> None:
    """Caption many images; each record is written as soon as it is made.

    Examples:

      paligemma caption photos/ --recursive --out captions.jsonl

      paligemma caption "shots/*.png" --format csv --out captions.csv --resume

      paligemma caption img1.jpg img2.jpg --format txt
    """
    from paligemma_cli.commands.common import (
        FAST_LAYOUT_MIN_JOBS,
        find_images,
        load_pipeline,
        sampling_options,
        stderr_console,
    )
    from paligemma_cli.errors import PaliGemmaError
    from paligemma_cli.processing.image import load_image

    console = stderr_console()
    images = find_images(paths, recursive)
    if not images:
        raise PaliGemmaError(f"no images found in {', '.join(paths)}" + ("" if recursive else " (try --recursive)"))
    if resume and out is None:
        raise PaliGemmaError("--resume needs --out: the file to continue")
    done = already_done(out, fmt) if resume and out is not None and out.exists() else set()
    todo = [p for p in images if p not in done]
    if done:
        console.print(f"resuming: {len(done)} image(s) already in {out}, {len(todo)} to go")
    opts = sampling_options(max_tokens)
    pipe = load_pipeline(model, device, dtype, console, quantize=quantize, compile=compile,
                         fast_layout=len(todo) >= FAST_LAYOUT_MIN_JOBS)

    if resume and out is not None and out.exists() and not out.read_bytes().endswith(b"\n") and out.stat().st_size:
        with open(out, "a", encoding="utf-8") as f:
            f.write("\n")  # end a line torn by an interrupted run, so new records start clean
    stream = open(out, "a" if resume else "w", newline="", encoding="utf-8") if out else sys.stdout
    write = record_writer(stream, fmt, header=not (resume and out is not None and out.exists() and out.stat().st_size))
    failed, ok = [], 0
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    t0 = time.perf_counter()
    progress = Progress(TextColumn("caption"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=console)
    try:
        with progress:
            task = progress.add_task("caption", total=len(todo), rate="")
            for start in range(0, len(todo), batch_size):
                chunk = todo[start:start + batch_size]
                loaded, names = [], []
                for name in chunk:
                    try:
                        loaded.append(load_image(name))
                        names.append(name)
                    except PaliGemmaError as e:
                        failed.append(name)
                        progress.console.print(f"skipped: {e}")
                if loaded:
                    texts = pipe.generate(loaded, [prompt] * len(loaded), opts)
                    for name, text in zip(names, texts):
                        write(name, text)
                        ok += 1
                progress.update(task, advance=len(chunk), rate=f"{ok / (time.perf_counter() - t0):.2f} img/s")
    finally:
        if out:
            stream.close()
    elapsed = time.perf_counter() - t0
    console.print(f"captioned {ok} image(s) in {elapsed:.1f}s ({ok / elapsed if elapsed else 0:.2f} img/s)"
                  + (f"; {len(failed)} unreadable: {', '.join(failed[:5])}{' …' if len(failed) > 5 else ''}" if failed else ""))
    if ok == 0 and todo:
        raise typer.Exit(1)


def record_writer(stream, fmt: "Format", header: bool = True):
    """A function (image, caption) -> None that writes one record and flushes it."""
    if fmt == Format.csv:
        writer = csv.writer(stream)
        if header:
            writer.writerow(["image", "caption"])
            stream.flush()

        def write(image: str, text: str) -> None:
            writer.writerow([image, text])
            stream.flush()
    elif fmt == Format.txt:
        def write(image: str, text: str) -> None:
            stream.write(f"{image}\t{' '.join(text.split())}\n")
            stream.flush()
    else:
        def write(image: str, text: str) -> None:
            stream.write(json.dumps({"image": image, "caption": text}, ensure_ascii=False) + "\n")
            stream.flush()
    return write


def already_done(out: Path, fmt: "Format") -> set[str]:
    """Images recorded in an earlier, perhaps interrupted, run. A torn last line is ignored."""
    text = out.read_text(encoding="utf-8", errors="replace")
    done = set()
    if fmt == Format.csv:
        rows = list(csv.reader(io.StringIO(text)))
        done = {r[0] for r in rows[1:] if len(r) == 2}
    elif fmt == Format.txt:
        done = {line.split("\t", 1)[0] for line in text.splitlines() if "\t" in line}
    else:
        for line in text.splitlines():
            try:
                done.add(json.loads(line)["image"])
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return done
