"""`paligemma detect IMAGE "cat ; dog"`: labelled boxes in the original image's pixels."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from paligemma_cli.options import CompileOpt, DeviceOpt, DtypeOpt, JsonOpt, MaxTokensOpt, ModelOpt, QuantizeOpt


def detect(
    image: Annotated[str, typer.Argument(help="Image file, or - for stdin.")],
    objects: Annotated[str, typer.Argument(help="What to find; several joined by ' ; ', e.g. \"cat ; dog\".")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Save a copy of the image with the boxes drawn.")] = None,
    model: ModelOpt = None,
    max_tokens: MaxTokensOpt = 64,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = "none",
    compile: CompileOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Find objects and print their boxes (x0 y0 x1 y1, pixels of the original image).

    Examples:

      paligemma detect examples/shapes.png "circle"

      paligemma detect street.jpg "car ; person" --out boxes.png --json
    """
    from paligemma_cli.commands.common import load_pipeline, sampling_options, stderr_console
    from paligemma_cli.errors import PaliGemmaError
    from paligemma_cli.outputs import check_output_file
    from paligemma_cli.processing.drawing import draw_boxes
    from paligemma_cli.processing.image import load_image
    from paligemma_cli.processing.locations import parse_detections
    from paligemma_cli.processing.text import check_text

    check_text(objects, "OBJECTS")
    labels = [o.strip() for o in objects.split(";") if o.strip()]
    if not labels:
        raise PaliGemmaError("say what to detect, e.g. \"cat\" or \"cat ; dog\"")
    prompt = "detect " + " ; ".join(labels)
    if out is not None:
        out = check_output_file(out, [image])
    picture = load_image(image)
    console = stderr_console()
    pipe = load_pipeline(model, device, dtype, console, quantize=quantize, compile=compile)
    raw = pipe.generate([picture], [prompt], sampling_options(max_tokens))[0]
    boxes = parse_detections(raw, picture.width, picture.height)
    if out is not None:
        try:
            draw_boxes(picture, boxes).save(out)
        except (OSError, ValueError) as e:
            raise PaliGemmaError(f"cannot write '{out}': {e}") from None
    if json_out:
        print(json.dumps({
            "image": image, "prompt": prompt, "model": str(pipe.folder), "raw": raw,
            "width": picture.width, "height": picture.height,
            "boxes": [{"label": b.label, "box": [round(v, 1) for v in (b.x0, b.y0, b.x1, b.y1)]} for b in boxes],
            "timings": {"load_s": round(pipe.load_s, 4), **pipe.last.as_dict()},
        }))
        return
    for b in boxes:
        print(f"{b.label}\t{b.x0:.0f} {b.y0:.0f} {b.x1:.0f} {b.y1:.0f}")
    if not boxes:
        console.print(f"nothing found (model said: {raw!r})", markup=False)
    if out is not None:
        console.print(f"wrote {out}", markup=False)
