"""`paligemma caption PATH...`: caption files, folders and globs, one record per image as it is made."""

from __future__ import annotations

import csv
import glob
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

      torchrun --nproc-per-node 8 -m paligemma_cli caption photos/ -r --out captions.jsonl --resume
    """
    from paligemma_cli.commands.common import (
        FAST_LAYOUT_MIN_JOBS,
        find_images,
        load_pipeline,
        sampling_options,
        stderr_console,
    )
    from paligemma_cli.distributed import torchrun_world
    from paligemma_cli.errors import PaliGemmaError
    from paligemma_cli.outputs import check_output_file, open_output, same_file_key, why
    from paligemma_cli.processing.text import check_text

    world = torchrun_world(device)
    if world is not None:
        try:
            return caption_on_ranks(world, device, paths, out, fmt, recursive, resume, batch_size, prompt, model,
                                    max_tokens, dtype, quantize, compile)
        finally:
            world.close()
    console = stderr_console()
    check_text(prompt, "--prompt")
    images = find_images(paths, recursive)
    if not images:
        raise PaliGemmaError(f"no images found in {', '.join(paths)}" + ("" if recursive else " (try --recursive)"))
    if resume and out is None:
        raise PaliGemmaError("--resume needs --out: the file to continue")
    if out is not None:
        out = check_output_file(out, images)
        if resume and part_files(out):  # a torchrun job stopped part-way: finish it as its ranks would
            from paligemma_cli.distributed import World

            return caption_on_ranks(World(), device, paths, out, fmt, recursive, resume, batch_size, prompt, model,
                                    max_tokens, dtype, quantize, compile)
        if not resume:
            remove_parts(out)
    continuing = resume and out is not None and out.exists() and out.stat().st_size > 0
    done = {same_file_key(name) for name in already_done(out, fmt)} if continuing else set()
    todo = [p for p in images if same_file_key(p) not in done]
    if done:
        console.print(f"resuming: {len(images) - len(todo)} image(s) already in {out}, {len(todo)} to go",
                      markup=False)
    opts = sampling_options(max_tokens)
    pipe = load_pipeline(model, device, dtype, console, quantize=quantize, compile=compile,
                         fast_layout=len(todo) >= FAST_LAYOUT_MIN_JOBS)

    # Paths are written back byte for byte, even names that are not valid UTF-8 (surrogateescape).
    if out is None:
        sys.stdout.reconfigure(errors="surrogateescape")
    stream = (open_output(out, "a" if continuing else "w", newline="", encoding="utf-8", errors="surrogateescape")
              if out else sys.stdout)
    write = record_writer(stream, fmt, header=not continuing)
    where = f"'{out}'" if out else "to stdout"
    t0 = time.perf_counter()
    try:
        ok, failed = caption_all(pipe, todo, prompt, opts, batch_size, write, console, "caption", lambda e, ok: (
            PaliGemmaError(f"cannot write {where}: {why(e)}; {ok} caption(s) were written")))
    finally:
        if out:
            try:
                stream.close()
            except OSError:
                pass  # every record is flushed as it is written: only the write that failed has anything left
    console.print(summary(ok, failed, time.perf_counter() - t0), markup=False)
    if ok == 0 and todo:
        raise typer.Exit(1)


def caption_on_ranks(world, device, paths, out, fmt, recursive, resume, batch_size, prompt, model, max_tokens, dtype,
                     quantize, compile) -> None:
    """`caption` as one rank of a torchrun job (or, to finish such a job, as its only process).

    Each rank captions its share of the images not yet done and appends each record, as it is made, to its
    own part file beside `--out`; at the end rank 0 merges every part into `--out` in input order. A job
    stopped part-way (a rank killed) leaves its parts: `--resume` counts their records as done and merges
    them with the new ones at the end, so nothing is captioned twice, nothing is lost, and the order holds.
    """
    from rich.console import Console

    from paligemma_cli.commands.common import FAST_LAYOUT_MIN_JOBS, find_images, load_pipeline, sampling_options
    from paligemma_cli.errors import PaliGemmaError
    from paligemma_cli.outputs import check_output_file, open_output, same_file_key, why
    from paligemma_cli.processing.text import check_text

    console = Console(stderr=True, highlight=False, quiet=not world.is_main)

    def inputs():
        check_text(prompt, "--prompt")
        if out is None:
            raise PaliGemmaError("under torchrun caption needs --out: the one file the ranks' records are merged into")
        images = find_images(paths, recursive)
        if not images:
            raise PaliGemmaError(f"no images found in {', '.join(paths)}" + ("" if recursive else " (try --recursive)"))
        if len(images) < world.size:
            raise PaliGemmaError(f"{len(images)} image(s) for {world.size} processes: launch at most {len(images)}")
        return images, check_output_file(out, images)

    images, target = world.agree(inputs)

    def pending():
        """Rank 0 settles what an earlier run left (records cut short) and names the images still to do."""
        if not resume:
            remove_parts(target)
            open_output(target, "w").close()
            return images
        done = set()
        if target.exists() and target.stat().st_size > 0:
            done.update(same_file_key(name) for name in already_done(target, fmt))
        for part in part_files(target):
            done.update(same_file_key(name) for name, _ in read_part(part))
        return [p for p in images if same_file_key(p) not in done]

    todo = world.agree(pending, main_only=True)
    if len(todo) < len(images):
        console.print(f"resuming: {len(images) - len(todo)} image(s) already in {target} and its parts, "
                      f"{len(todo)} to go", markup=False)
    mine = list(world.shard(todo))
    opts = sampling_options(max_tokens)
    on = str(world.device) if world.distributed else device
    pipe = world.agree(lambda: load_pipeline(model, on, dtype, console, quantize=quantize, compile=compile,
                                             fast_layout=len(mine) >= FAST_LAYOUT_MIN_JOBS))
    part = part_path(target, world.rank)
    stream = open_output(part, "a", newline="", encoding="utf-8", errors="surrogateescape")
    write = record_writer(stream, Format.jsonl)
    t0 = time.perf_counter()
    label = f"caption (rank 0 of {world.size})" if world.distributed else "caption"
    try:
        ok, failed = caption_all(pipe, mine, prompt, opts, batch_size, write, console, label, lambda e, ok: (
            PaliGemmaError(f"cannot write '{part}': {why(e)}; the {ok} caption(s) written there so far are kept "
                           "for --resume")))
    finally:
        try:
            stream.close()
        except OSError:
            pass
    counts = world.gather((ok, failed))
    world.agree(lambda: merge_parts(target, fmt, images), main_only=True)
    ok = sum(n for n, _ in counts)
    failed = [name for _, names in counts for name in names]
    console.print(summary(ok, failed, time.perf_counter() - t0, world.size if world.distributed else 1), markup=False)
    if ok == 0 and todo:
        raise typer.Exit(1)


def caption_all(pipe, names: list[str], prompt: str, opts, batch_size: int, write, console, label: str,
                write_error) -> tuple[int, list[str]]:
    """Caption `names` in batches under a progress bar, `write(name, caption)` each as it is made.
    Unreadable images are reported and skipped; a write that fails raises `write_error(error, written)`.
    Returns (captions written, unreadable names)."""
    from paligemma_cli.commands.common import each_batch_of_images

    ok = 0

    def caption_batch(readable: list[str], images: list) -> int:
        nonlocal ok
        for name, text in zip(readable, pipe.generate(images, [prompt] * len(images), opts)):
            try:
                write(name, text)
            except OSError as e:  # a full disk: the records written so far stay
                raise write_error(e, ok) from None
            ok += 1
        return len(readable)

    failed = each_batch_of_images(names, batch_size, console, label, caption_batch)
    return ok, failed


def summary(ok: int, failed: list[str], seconds: float, processes: int = 1) -> str:
    """The closing line on stderr: how many, how fast, on how many processes, which were unreadable."""
    return (f"captioned {ok} image(s) in {seconds:.1f}s ({ok / seconds if seconds else 0:.2f} img/s)"
            + (f" on {processes} processes" if processes > 1 else "")
            + (f"; {len(failed)} unreadable: {', '.join(failed[:5])}{' …' if len(failed) > 5 else ''}" if failed else ""))


def part_path(out: Path, rank: int) -> Path:
    """Where rank `rank` of a torchrun job appends its records (JSON lines), hidden beside `out`."""
    return out.with_name(f".{out.name}.part-{rank}")


def part_files(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{glob.escape(out.name)}.part-*"))


def remove_parts(out: Path) -> None:
    """A new run over `out` drops the parts an earlier, stopped, job left there."""
    for part in part_files(out):
        part.unlink(missing_ok=True)


def read_part(part: Path) -> list[tuple[str, str]]:
    """The (image, caption) records of a part file; a torn last record (its rank killed while writing it)
    is cut off the file first, so records appended later start clean."""
    data = part.read_bytes()
    keep = complete_prefix(data, Format.jsonl)
    if keep < len(data):
        with open(part, "r+b") as f:
            f.truncate(keep)
    records = []
    for line in data[:keep].decode("utf-8", errors="surrogateescape").splitlines():
        try:
            record = json.loads(line)
            records.append((record["image"], record["caption"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return records


def merge_parts(out: Path, fmt: "Format", images: list[str]) -> int:
    """Append the records of `out`'s part files to `out`, in the order of `images` (records of other images
    after them), leaving out images `out` already holds; then delete the parts. A merge cut short is
    finished by the next: what reached `out` is not added twice. Returns how many records were added."""
    from paligemma_cli.outputs import open_output, same_file_key

    parts = part_files(out)
    if not parts:
        return 0
    records: dict[str, tuple[str, str]] = {}
    for part in parts:
        for name, text in read_part(part):
            records.setdefault(same_file_key(name), (name, text))
    if out.exists() and out.stat().st_size > 0:
        for name in already_done(out, fmt):  # which also cuts a torn last record
            records.pop(same_file_key(name), None)
    existing = out.exists() and out.stat().st_size > 0
    position = {same_file_key(name): i for i, name in enumerate(images)}
    ordered = sorted(records.items(), key=lambda item: position.get(item[0], len(position)))
    with open_output(out, "a", newline="", encoding="utf-8", errors="surrogateescape") as stream:
        write = record_writer(stream, fmt, header=not existing)
        for _, (name, text) in ordered:
            write(name, text)
    for part in parts:
        part.unlink(missing_ok=True)
    return len(ordered)


def _has_surrogates(text: str) -> bool:
    return any("\ud800" <= c <= "\udfff" for c in text)


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
            # A name that is not valid UTF-8 holds lone surrogates: JSON escapes those (\udcxx) and reads
            # them back as the same name.
            name = json.dumps(image, ensure_ascii=_has_surrogates(image))
            stream.write(f'{{"image": {name}, "caption": {json.dumps(text, ensure_ascii=False)}}}\n')
            stream.flush()
    return write


def already_done(out: Path, fmt: "Format") -> list[str]:
    """Images recorded in an earlier, perhaps interrupted, run. A torn last record (a run killed while
    writing it) is cut off the file first, so the records that follow start clean."""
    from paligemma_cli.outputs import cut_torn_record

    text = cut_torn_record(out, lambda data: complete_prefix(data, fmt))
    if fmt == Format.csv:
        return [r[0] for r in list(csv.reader(io.StringIO(text)))[1:] if len(r) == 2]
    if fmt == Format.txt:
        return [line.split("\t", 1)[0] for line in text.splitlines() if "\t" in line]
    done = []
    for line in text.splitlines():
        try:
            done.append(json.loads(line)["image"])
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return done


def complete_prefix(data: bytes, fmt: "Format") -> int:
    """The length of `data` up to the end of its last complete record. Every record ends with a newline,
    so a record cut short has none; a CSV caption may hold newlines inside quotes, so for CSV the cut is
    where the rows parse whole."""
    end = data.rfind(b"\n") + 1
    if fmt != Format.csv:
        return end
    while end > 0:
        text = data[:end].decode("utf-8", errors="surrogateescape")
        rows = list(csv.reader(io.StringIO(text)))
        if all(len(r) == 2 for r in rows) and text.count('"') % 2 == 0:
            return end
        end = data.rfind(b"\n", 0, end - 1) + 1
    return 0
