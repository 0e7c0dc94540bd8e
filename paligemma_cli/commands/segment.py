"""`paligemma segment IMAGE "circle ; square"`: masks in the original image's pixels, decoded as big_vision does."""

from __future__ import annotations

import glob
import json
import re
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from paligemma_cli.options import CompileOpt, DeviceOpt, DtypeOpt, JsonOpt, MaxTokensOpt, ModelOpt, QuantizeOpt


def segment(
    images: Annotated[list[str], typer.Argument(metavar="IMAGE", help="Image file(s), folders or glob patterns; - for stdin.", show_default=False)],
    objects: Annotated[str, typer.Argument(metavar="OBJECTS", help="What to segment; several joined by ' ; ', e.g. \"cat ; dog\".", show_default=False)],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Save a copy of the image with the masks and boxes drawn (one image only).")] = None,
    masks_dir: Annotated[Optional[Path], typer.Option("--masks-dir", help="Write each object's mask as a black-and-white PNG of the image's size: DIR/<image>-<n>-<label>.png.")] = None,
    vae: Annotated[Optional[str], typer.Option("--vae", help="The VQ-VAE checkpoint (vae-oid.npz). Default: vae-oid.npz beside the model, `vae` in the config file, then `paligemma download --vae`'s copy.", show_default=False)] = None,
    jsonl: Annotated[Optional[Path], typer.Option("--jsonl", help="Append one JSON record per image to this file as each is made (for folders).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="With --jsonl: skip images already in the file.")] = False,
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="Descend into sub-folders.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per forward pass.")] = 8,
    model: ModelOpt = None,
    max_tokens: MaxTokensOpt = 128,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = "none",
    compile: CompileOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Segment objects: one line per object with its label, box (x0 y0 x1 y1, pixels of the original image, ends exclusive) and mask area in pixels; --json adds each mask in COCO's run-length encoding.

    The model answers 4 location and 16 mask tokens per object. The mask tokens go through the VQ-VAE PaliGemma was trained with (big_vision's vae-oid.npz) to a 64x64 mask, which is stretched over the box and thresholded, as big_vision scores it. Malformed objects are skipped.

    Several images, a folder or a glob give one JSON record per image, on stdout or in --jsonl.

    Examples:

      paligemma segment examples/shapes.png circle --out masks.png

      paligemma segment photo.jpg "cat ; dog" --json --masks-dir masks/

      paligemma segment photos/ "person" --jsonl people.jsonl --resume
    """
    from paligemma_cli.commands.common import (
        FAST_LAYOUT_MIN_JOBS,
        each_batch_of_images,
        find_images,
        load_pipeline,
        sampling_options,
        stderr_console,
    )
    from paligemma_cli.errors import PaliGemmaError
    from paligemma_cli.inference.segmentation import MaskCodec, segment_images, segment_prompt, split_labels
    from paligemma_cli.outputs import check_output_dir_apart, check_output_file, open_output, same_file_key, why
    from paligemma_cli.processing.image import load_image
    from paligemma_cli.processing.text import check_text
    from paligemma_cli.settings import resolve_model, resolve_vae

    labels = split_labels(check_text(objects, "OBJECTS"))
    prompt = segment_prompt(labels)  # an empty list fails here, before anything loads
    console = stderr_console()
    paths = find_images(images, recursive)
    if not paths:
        raise PaliGemmaError(f"no images found in {', '.join(images)}" + ("" if recursive else " (try --recursive)"))
    # One named file answers in text (or one JSON object); folders, globs and lists answer in records.
    single = len(images) == 1 and not Path(images[0]).is_dir() and not glob.has_magic(images[0]) and jsonl is None
    if out is not None and not single:
        raise PaliGemmaError("--out draws one image; for several, use --masks-dir or the masks in the JSON records")
    if resume and jsonl is None:
        raise PaliGemmaError("--resume needs --jsonl: the file to continue")
    # No output may land on an input: not the overlay, not the records, not a mask file.
    if out is not None:
        out = check_output_file(out, paths)
    if jsonl is not None:
        jsonl = check_output_file(jsonl, paths, "--jsonl")
    if masks_dir is not None:
        masks_dir = check_output_dir_apart(masks_dir, paths, "--masks-dir")
    first = load_image(paths[0]) if single else None  # a bad image fails before the model loads
    folder = resolve_model(model)
    codec = MaskCodec.load(resolve_vae(vae, folder))
    done = _done(jsonl) if resume and jsonl is not None and jsonl.exists() else set()
    todo = [p for p in paths if same_file_key(p) not in done]  # however the path is spelled this time
    if done:
        console.print(f"resuming: {len(done)} image(s) already in {jsonl}, {len(todo)} to go", markup=False)
    opts = sampling_options(max_tokens)
    pipe = load_pipeline(str(folder), device, dtype, console, quantize=quantize, compile=compile,
                         fast_layout=len(todo) >= FAST_LAYOUT_MIN_JOBS)
    meta = {"prompt": prompt, "model": str(pipe.folder), "vae": str(codec.path)}

    if single:
        ((raw, segments),) = segment_images(pipe, codec, [first], labels, opts)
        written = _write_masks(masks_dir, mask_stems(paths)[paths[0]], segments)
        if out is not None:
            from paligemma_cli.processing.drawing import draw_masks

            _save(draw_masks(first, [(s.label, s.box, s.mask) for s in segments]), out)
        if json_out:
            print(json.dumps({**_record(paths[0], first, raw, segments, written), **meta,
                              "timings": {"load_s": round(pipe.load_s, 4), **pipe.last.as_dict()}}))
        else:
            for s in segments:
                print(f"{s.label}\t{' '.join(map(str, s.box))}\t{s.area}")
            if not segments:
                console.print(f"nothing found (model said: {raw!r})", markup=False)
        for path in ([out] if out is not None else []) + written:
            console.print(f"wrote {path}", markup=False)
        return

    stream = open_output(jsonl, "a" if resume else "w", encoding="utf-8") if jsonl is not None else sys.stdout
    t0, ok = time.perf_counter(), 0
    stems = mask_stems(paths)

    def segment_batch(names: list[str], loaded: list) -> int:
        nonlocal ok
        for name, image, (raw, segments) in zip(names, loaded, segment_images(pipe, codec, loaded, labels, opts)):
            written = _write_masks(masks_dir, stems[name], segments)
            record = {**_record(name, image, raw, segments, written), **meta}
            try:
                stream.write(json.dumps(record, ensure_ascii=False) + "\n")
                stream.flush()
            except OSError as e:
                if jsonl is None:
                    raise  # stdout: the CLI reports it
                raise PaliGemmaError(f"cannot write '{jsonl}': {why(e)}; the {ok} record(s) before it "
                                     "are kept (--resume continues)") from None
            ok += 1
        return len(names)

    try:
        failed = each_batch_of_images(todo, batch_size, console, "segment", segment_batch)
    finally:
        if jsonl is not None:
            try:
                stream.close()
            except OSError:
                pass  # every record is flushed as it is written: only the write that failed has anything left
    console.print(f"segmented {ok} image(s) in {time.perf_counter() - t0:.1f}s"
                  + (f"; {len(failed)} unreadable" if failed else ""), markup=False)
    if ok == 0 and todo:
        raise typer.Exit(1)


def _record(name: str, image, raw: str, segments, written: list[Path]) -> dict:
    """One image's JSON record: each object's label, box, area and COCO RLE mask."""
    from paligemma_cli.processing.segmentation import rle_encode

    objects = []
    for i, s in enumerate(segments):
        obj = {"label": s.label, "box": list(s.box), "area": s.area, "mask": rle_encode(s.mask)}
        if written:
            obj["mask_file"] = str(written[i])
        objects.append(obj)
    return {"image": name, "width": image.width, "height": image.height, "raw": raw, "objects": objects}


def mask_stems(names: list[str]) -> dict[str, str]:
    """Each image's name for its mask files: the file's stem, numbered where two images of the run share
    one (photos/a.png and shots/a.png would otherwise write over each other's masks)."""
    stems, seen = {}, {}
    for name in names:
        stem = "stdin" if name == "-" else Path(name).stem
        seen[stem] = seen.get(stem, 0) + 1
        stems[name] = stem if seen[stem] == 1 else f"{stem}~{seen[stem]}"
    return stems


def _write_masks(folder: Path | None, stem: str, segments) -> list[Path]:
    """Each mask as an 8-bit PNG (255 = object) named after the image (`stem`), its index and label."""
    if folder is None:
        return []
    from PIL import Image

    from paligemma_cli.errors import PaliGemmaError

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PaliGemmaError(f"cannot create '{folder}': {e.strerror or e}") from None
    paths = []
    for i, s in enumerate(segments):
        label = re.sub(r"[^\w-]+", "_", s.label).strip("_") or "object"
        path = folder / f"{stem}-{i}-{label}.png"
        _save(Image.fromarray(s.mask.astype("uint8") * 255, "L"), path)
        paths.append(path)
    return paths


def _save(image, path: Path) -> None:
    from paligemma_cli.errors import PaliGemmaError

    try:
        image.save(path)
    except (OSError, ValueError) as e:
        raise PaliGemmaError(f"cannot write '{path}': {e}") from None


def _done(path: Path) -> set[str]:
    """The resolved paths of the images in a JSONL file of an earlier, perhaps interrupted, run; a last
    record cut short is removed from the file."""
    from paligemma_cli.outputs import cut_torn_record, same_file_key

    done = set()
    for line in cut_torn_record(path).splitlines():
        try:
            done.add(same_file_key(json.loads(line)["image"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return done
