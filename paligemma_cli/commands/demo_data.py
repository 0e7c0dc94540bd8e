"""`paligemma demo-data`: write a synthetic "shapes world" dataset for the built-in demo model.

Only typer and the standard library are imported at the top, so `paligemma --help` stays instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def demo_data(
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Folder to write images/ and data.jsonl into.", show_default=False)],
    n: Annotated[int, typer.Option("--n", help="Number of examples (one new image each).")] = 20000,
    seed: Annotated[int, typer.Option("--seed", help="Same seed, same bytes. Use different seeds for train and eval.")] = 0,
    image_size: Annotated[int, typer.Option("--image-size", help="Side of the square images in pixels.")] = 64,
    task: Annotated[Optional[list[str]], typer.Option("--task", help="Only this task (repeat for several): detect, caption, color, spatial, count.", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Write into OUT even if it is not empty.")] = False,
) -> None:
    """Write a synthetic shapes dataset: 1-3 coloured circles, squares and triangles per image.

    Each example is one new image and one task: detect 30%, caption 20%, color 20%, left/right 20%, count 10%.
    With --task, only those tasks (in the same proportions to each other): `--task caption` writes
    image-caption pairs for contrastive training.

    Writes OUT/images/*.png and OUT/data.jsonl, one {"image", "prefix", "suffix", "task"} per line.

    Prints the path of data.jsonl on stdout.

    Examples:

        paligemma demo-data data/shapes-train --n 20000 --seed 0

        paligemma demo-data data/shapes-eval --n 500 --seed 1

        paligemma demo-data data/shapes-captions --n 60000 --seed 0 --task caption
    """
    from paligemma_cli.errors import PaliGemmaError
    from paligemma_cli.outputs import is_marked

    if n < 1:
        raise PaliGemmaError(f"--n must be at least 1, got {n}")
    if not 32 <= image_size <= 1024:
        raise PaliGemmaError(f"--image-size must be between 32 and 1024 pixels, got {image_size}")
    from paligemma_cli.data.shapes import task_cycle

    try:
        task_cycle(task)
    except ValueError as e:
        raise PaliGemmaError(f"--task: {e}") from None
    if out.exists() and not out.is_dir():
        raise PaliGemmaError(f"{out} exists and is not a folder; choose another path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise PaliGemmaError(f"{out} is not empty; choose a new folder or pass --force to write into it")
    mine = [name for name in ("data.jsonl", "images") if (out / name).exists()]
    if mine and not is_marked(out):  # --force adds to a folder; it never replaces a person's dataset
        raise PaliGemmaError(f"{out} holds {' and '.join(mine)} that this tool did not write; choose another folder")

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from paligemma_cli.data.shapes import write_dataset

    progress = Progress(
        TextColumn("writing examples"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    with progress:
        bar = progress.add_task("write", total=n)
        path = write_dataset(out, n, seed, image_size, progress=lambda done, _: progress.update(bar, completed=done),
                             tasks=task)
    typer.echo(str(path))
