"""`paligemma classify IMAGE LABELS`: zero-shot classification with a SigLIP dual encoder.

Only typer and the standard library are imported at the top, so `paligemma --help` stays instant.
"""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from paligemma_cli.options import DeviceOpt, DtypeOpt, JsonOpt

DualEncoderOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", help="SigLIP dual-encoder folder (e.g. a run of `paligemma train --objective siglip`), "
                          "or a Hub id already downloaded.", show_default=False)]


def classify(
    image: Annotated[str, typer.Argument(help="Image file, or - to read it from stdin.", show_default=False)],
    labels: Annotated[str, typer.Argument(help='Comma-separated candidate texts, e.g. "a red circle,a blue square".',
                                          show_default=False)],
    model: DualEncoderOpt = None,
    json_out: JsonOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Score how well each label describes an image: one probability per label, most likely first.

    Each probability is SigLIP's sigmoid of the scaled image-text similarity, judged on its own:
    several labels can all be likely, or none, and they need not sum to 1.

    Examples:

      paligemma classify scene.png "a red circle,a blue square,a green triangle" --model runs/siglip

      paligemma classify photo.jpg "a cat,a dog,a car" --model google/siglip-base-patch16-224 --json

      cat scene.png | paligemma classify - "a red circle,a blue circle" -m runs/siglip
    """
    from paligemma_cli.commands.common import load_dual_encoder
    from paligemma_cli.errors import PaliGemmaError
    from paligemma_cli.inference.embeddings import label_probabilities
    from paligemma_cli.processing.image import load_image, preprocess
    from paligemma_cli.processing.text import check_text

    check_text(labels, "LABELS")
    names = [label.strip() for label in labels.split(",")]
    if not any(names):
        raise PaliGemmaError('no labels: give them comma-separated, e.g. "a red circle,a blue square"')
    if not all(names):
        raise PaliGemmaError(f"empty label in {labels!r}: remove the extra comma")
    if len(set(names)) != len(names):
        raise PaliGemmaError(f"a label appears twice in {labels!r}")
    picture = load_image(image)  # before the model: a typo in the path should not wait for loading
    encoder, tokenizer, folder = load_dual_encoder(model, device, dtype)
    probs = label_probabilities(encoder, tokenizer, preprocess([picture], encoder.config.vision.image_size), names)[0]
    ranked = sorted(zip(names, probs.tolist()), key=lambda pair: -pair[1])  # stable: equal scores keep label order

    if json_out:
        print(json.dumps({"model": str(folder), "image": image,
                          "labels": [{"label": name, "probability": p} for name, p in ranked]}, ensure_ascii=False))
        return
    for name, p in ranked:
        print(f"{p:.4f}\t{name}")  # plain print: labels are user text, never Rich markup
