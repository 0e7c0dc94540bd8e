"""`paligemma ask IMAGE QUESTION`: one question about one image, the answer streamed to stdout."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from paligemma_cli.options import (
    CompileOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    LangOpt,
    MaxTokensOpt,
    ModelOpt,
    QuantizeOpt,
    SeedOpt,
    TemperatureOpt,
    TopKOpt,
    TopPOpt,
)


def ask(
    image: Annotated[str, typer.Argument(help="Image file (any format Pillow reads), or - for stdin.")],
    question: Annotated[Optional[str], typer.Argument(help="The question, e.g. \"what is on the table?\".")] = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="Send a raw PaliGemma prefix instead, e.g. \"caption en\", \"ocr\", \"detect cat\".")] = None,
    more_images: Annotated[Optional[list[str]], typer.Option("--image", "-i", help="Another image the question is about, after IMAGE (repeat for more): each image's tokens go in order before the prompt, as in PaliGemma's multi-image transfers (NLVR2).", show_default=False)] = None,
    lang: LangOpt = "en",
    model: ModelOpt = None,
    max_tokens: MaxTokensOpt = 64,
    temperature: TemperatureOpt = 0.0,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = "none",
    compile: CompileOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Ask a question about an image; the answer streams to stdout.

    Examples:

      paligemma ask examples/shapes.png "what color is the circle?"

      paligemma ask photo.jpg --prompt "caption en"

      paligemma ask photo.jpg "wie viele Katzen?" --lang de --json

      paligemma ask photo.jpg "what is this?" --quantize int8

      paligemma ask left.jpg --image right.jpg "is there a dog in both images?"
    """
    from paligemma_cli.commands.common import load_pipeline, sampling_options, stderr_console, write_stdout
    from paligemma_cli.errors import PaliGemmaError
    from paligemma_cli.processing.image import load_image
    from paligemma_cli.processing.text import check_text

    if prompt is None:
        if not question:
            raise PaliGemmaError("give a QUESTION, or a raw prefix with --prompt")
        prompt = f"answer {lang} {check_text(question, 'the question')}"
    elif question:
        raise PaliGemmaError("give either a QUESTION or --prompt, not both")
    check_text(prompt, "--prompt")
    opts = sampling_options(max_tokens, temperature, top_k, top_p, seed)
    picture = load_image(image)  # fail on a bad image before paying for the model
    others = [load_image(p) for p in more_images or []]
    console = stderr_console()
    pipe = load_pipeline(model, device, dtype, console, quantize=quantize, compile=compile)
    seen = [picture, *others] if others else picture
    if json_out:
        answer = "".join(pipe.stream(seen, prompt, opts))
        record = {"answer": answer, "prompt": prompt, "image": image, "model": str(pipe.folder),
                  "timings": {"load_s": round(pipe.load_s, 4), **pipe.last.as_dict()}}
        if others:
            record["images"] = [image, *more_images]
        print(json.dumps(record))
        return
    for piece in pipe.stream(seen, prompt, opts):
        write_stdout(piece)
    write_stdout("\n")
    s = pipe.last
    console.print(f"[dim]{s.new_tokens} tokens · first token {s.ttft_s:.2f}s · {s.tokens_per_s:.1f} tok/s · "
                  f"load {pipe.load_s:.2f}s[/]")
