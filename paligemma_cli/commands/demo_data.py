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
    task: Annotated[Optional[list[str]], typer.Option("--task", help="Only this task (repeat for several): detect, caption, color, spatial, count; or segment, mask (written only when named); all: every task, half of the examples segment.", show_default=False)] = None,
    vae: Annotated[Optional[Path], typer.Option("--vae", help="With --task segment: the VQ-VAE whose encoder writes the <seg> codes. Default: the demo model's.", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Write into OUT even if it is not empty.")] = False,
) -> None:
    """Write a synthetic shapes dataset: 1-3 coloured circles, squares and triangles per image.

    Each example is one new image and one task: detect 30%, caption 20%, color 20%, left/right 20%, count 10%.
    With --task, only those tasks (in the same proportions to each other): `--task caption` writes
    image-caption pairs for contrastive training.

    Two tasks are written only when named. `segment circle` answers the circle's box and 16 <seg> codes
    of its mask, from a VQ-VAE's encoder (--vae; default the demo model's), and the line names the mask
    (OUT/masks/*.png) that `eval` scores against. `mask` writes one shape's mask as the image, data for
    `train --objective vqvae`. `all` is the default mix with a segment example after each of its examples.

    Writes OUT/images/*.png and OUT/data.jsonl, one {"image", "prefix", "suffix", "task"} per line.

    Prints the path of data.jsonl on stdout.

    Examples:

        paligemma demo-data data/shapes-train --n 20000 --seed 0

        paligemma demo-data data/shapes-eval --n 500 --seed 1

        paligemma demo-data data/shapes-captions --n 60000 --seed 0 --task caption

        paligemma demo-data data/shapes-masks --n 20000 --seed 3 --task mask

        paligemma demo-data data/shapes-segment --n 20000 --seed 0 --task segment --vae runs/vqvae/vae-oid.npz

        paligemma demo-data data/shapes-all --n 40000 --seed 0 --task all
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

    encode_mask = None
    if task and ("segment" in task or "all" in task):
        encode_mask = mask_encoder(vae)
    elif vae is not None:
        raise PaliGemmaError("--vae writes the codes of segment examples: it goes with --task segment")

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
                             tasks=task, encode_mask=encode_mask)
    typer.echo(str(path))


def mask_encoder(vae: Path | None):
    """`encode_mask(mask, box) -> codes` from the VQ-VAE `vae`, else from the demo model's."""
    from paligemma_cli.checkpoints.vae import VAE_FILENAME
    from paligemma_cli.errors import PaliGemmaError
    from paligemma_cli.inference.segmentation import MaskCodec
    from paligemma_cli.settings import DEMO_MODEL

    path = vae if vae is not None else DEMO_MODEL / VAE_FILENAME
    if not path.is_file():
        if vae is not None:
            raise PaliGemmaError(f"--vae '{vae}' does not exist")
        raise PaliGemmaError("--task segment needs a VQ-VAE to encode the masks: pass --vae PATH (train one with "
                             "`paligemma train DATA --objective vqvae` on `demo-data --task mask` data)")
    codec = MaskCodec.load(path)
    if not codec.has_encoder:
        raise PaliGemmaError(f"'{path}' holds only the VQ-VAE's decoder; --task segment needs its encoder too")
    return codec.encode_mask
