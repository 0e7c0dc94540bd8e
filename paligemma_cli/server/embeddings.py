"""`POST /v1/embeddings` with a SigLIP dual encoder: texts and images in one shared space.

OpenAI's request takes `input` as a string or a list of strings. Images go in the same list, either as
`{"type": "image_url", "image_url": {"url": …}}` objects (the chat content-part shape) or as strings that
are `data:image/…;base64,…` URLs. Vectors are L2-normalised (as OpenAI's are), so a dot product is the
cosine similarity SigLIP was trained on; `encoding_format: "base64"` (what the `openai` client asks for)
sends them as little-endian float32 bytes.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from paligemma_cli.inference.embeddings import embed_images, embed_texts
from paligemma_cli.model.siglip import DualEncoder
from paligemma_cli.processing.image import preprocess
from paligemma_cli.processing.siglip_tokenizer import SiglipTokenizer
from paligemma_cli.server.config import ServerConfig
from paligemma_cli.server.errors import bad_request

MAX_INPUTS = 256


@dataclass(frozen=True)
class EmbeddingsRequest:
    model: str | None
    items: tuple[tuple[str, str], ...]  # ("text", text) or ("image", url), in the order given
    encoding_format: str
    dimensions: int | None


def parse_embeddings_request(body, cfg: ServerConfig) -> EmbeddingsRequest:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request("model must be a string", "model")
    raw = body.get("input")
    raw = [raw] if isinstance(raw, (str, dict)) else raw
    if not isinstance(raw, list) or not raw:
        raise bad_request("input must be a string, or a non-empty list of strings and image_url objects", "input")
    if len(raw) > MAX_INPUTS:
        raise bad_request(f"{len(raw)} inputs; this server embeds at most {MAX_INPUTS} per request", "input")
    items = []
    for i, item in enumerate(raw):
        if isinstance(item, str) and item[:11].lower() == "data:image/":
            items.append(("image", item))
        elif isinstance(item, str):
            if len(item) > cfg.max_prompt_chars:
                raise bad_request(f"input[{i}] is {len(item)} characters; at most {cfg.max_prompt_chars}", "input")
            items.append(("text", item))
        elif isinstance(item, dict) and item.get("type") == "image_url":
            spec = item.get("image_url")
            url = spec.get("url") if isinstance(spec, dict) else spec
            if not isinstance(url, str) or not url:
                raise bad_request(f"input[{i}].image_url.url must be a non-empty string", "input")
            items.append(("image", url))
        elif isinstance(item, dict) and item.get("type") == "text" and isinstance(item.get("text"), str):
            items.append(("text", item["text"]))
        else:
            raise bad_request(f"input[{i}] must be a string or an image_url object (token arrays are not supported)",
                              "input")
    n_images = sum(kind == "image" for kind, _ in items)
    if n_images > cfg.max_images:
        raise bad_request(f"{n_images} images; this server takes at most {cfg.max_images} per request", "input",
                          "too_many_images")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise bad_request("encoding_format must be 'float' or 'base64'", "encoding_format")
    dims = body.get("dimensions")
    if dims is not None and (isinstance(dims, bool) or not isinstance(dims, int)):
        raise bad_request("dimensions must be an integer", "dimensions")
    return EmbeddingsRequest(model, tuple(items), fmt, dims)


def compute_embeddings(model: DualEncoder, tokenizer: SiglipTokenizer, texts: list[str], images: list) -> tuple:
    """(text vectors (T, D), image vectors (I, D), text tokens counted) as normalised float32 numpy arrays."""
    with torch.inference_mode():
        dim = model.config.vision.hidden_size
        txt = embed_texts(model, tokenizer, texts) if texts else torch.empty(0, dim)
        img = embed_images(model, preprocess(images, model.config.vision.image_size)) if images else torch.empty(0, dim)
    tokens = sum(len(tokenizer.encode(t)) for t in texts)
    return F.normalize(txt, dim=-1).numpy(), F.normalize(img, dim=-1).numpy(), tokens


def embeddings_body(model_name: str, vectors: list[np.ndarray], fmt: str, tokens: int) -> dict:
    def encode(v: np.ndarray):
        if fmt == "base64":
            return base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")
        return v.astype(np.float32).tolist()

    return {"object": "list", "model": model_name,
            "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
