"""`POST /v1/chat/completions`: the request's fields checked and read, and OpenAI's response shapes.

Reference: OpenAI's API reference for chat completions (request fields, `chat.completion` and
`chat.completion.chunk` objects, `usage`, streaming with `data: [DONE]`). Fields that would change an
answer in a way this server cannot honour (`n` > 1, `logprobs`, penalties, `logit_bias`, `tools`, JSON
response formats) are refused with 400 rather than ignored; fields that only describe the caller
(`user`, `metadata`, `store`, ...) are ignored. Temperature defaults to 0 (greedy), PaliGemma's default,
not OpenAI's 1.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

from paligemma_cli.inference.batching import Finished
from paligemma_cli.inference.generate import SamplingOptions
from paligemma_cli.processing.locations import parse_detections
from paligemma_cli.server.config import ServerConfig
from paligemma_cli.server.errors import bad_request
from paligemma_cli.server.prompts import ChatPrompt, messages_to_prompt

MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 100
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class ChatRequest:
    model: str | None
    prompt: ChatPrompt
    opts: SamplingOptions
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


def _number(body: dict, key: str, lo: float, hi: float, default, *, integer: bool = False, lo_open: bool = False):
    value = body.get(key)
    if value is None:
        return default
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or value != value:  # bool is an int; NaN != NaN
        raise bad_request(f"{key} must be {'an integer' if integer else 'a number'}", key)
    if value < lo or value > hi or (lo_open and value == lo):
        raise bad_request(f"{key} must be in {'(' if lo_open else '['}{lo}, {hi}], got {value}", key)
    return value


def _refuse_unless(body: dict, key: str, allowed: tuple, what: str) -> None:
    if body.get(key) not in allowed:
        raise bad_request(f"{key} is not supported by this server: {what}", key, "unsupported_parameter")


def parse_chat_request(body, cfg: ServerConfig) -> ChatRequest:
    """The generation a chat request asks for. Raises ApiError 400 for anything malformed or refused."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request("model must be a string", "model")
    prompt = messages_to_prompt(body.get("messages"), cfg.lang)
    if not prompt.image_urls:
        raise bad_request("PaliGemma answers about images: add an image_url content part (a base64 data: URL)",
                          "messages", "image_required")
    if len(prompt.image_urls) > cfg.max_images:
        raise bad_request(f"{len(prompt.image_urls)} images; this server takes at most {cfg.max_images} per request",
                          "messages", "too_many_images")
    if len(prompt.prompt) > cfg.max_prompt_chars:
        raise bad_request(f"the prompt is {len(prompt.prompt)} characters; this server takes at most "
                          f"{cfg.max_prompt_chars}", "messages", "prompt_too_long")

    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, key, 1, cfg.max_tokens, cfg.max_tokens, integer=True)
    temperature = _number(body, "temperature", 0, 2, 0.0)
    top_p = _number(body, "top_p", 0, 1, None, lo_open=True)
    top_k = _number(body, "top_k", 1, 2**31, None, integer=True)
    seed = _number(body, "seed", 0, MAX_SEED, None, integer=True)
    _refuse_unless(body, "n", (None, 1), "one choice per request (n=1)")
    _refuse_unless(body, "logprobs", (None, False), "no log-probabilities")
    _refuse_unless(body, "top_logprobs", (None, 0), "no log-probabilities")
    _refuse_unless(body, "presence_penalty", (None, 0), "no penalties")
    _refuse_unless(body, "frequency_penalty", (None, 0), "no penalties")
    _refuse_unless(body, "logit_bias", (None, {}), "no logit_bias")
    _refuse_unless(body, "tools", (None, []), "PaliGemma does not call tools")
    _refuse_unless(body, "functions", (None, []), "PaliGemma does not call functions")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise bad_request("response_format is not supported by this server: text only", "response_format",
                          "unsupported_parameter")

    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if (not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)):
        raise bad_request(f"stop must be a string or a list of at most {MAX_STOP_STRINGS} non-empty strings of at "
                          f"most {MAX_STOP_CHARS} characters", "stop")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad_request("stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad_request("stream_options must be an object", "stream_options")
    opts = SamplingOptions(max_new_tokens=max_tokens, temperature=float(temperature), top_k=top_k,
                           top_p=None if top_p is None else float(top_p), seed=seed)
    return ChatRequest(model, prompt, opts, tuple(stops), stream, bool(options.get("include_usage")))


# --- responses ----------------------------------------------------------------------------------------


def new_completion_id() -> str:
    return "chatcmpl-" + secrets.token_hex(12)


def usage(done: Finished) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def detections(text: str, task: str, width: int, height: int) -> list[dict] | None:
    """Boxes (pixels of the first image) and segmentation codes read from a `detect`/`segment` answer."""
    if task not in ("detect", "segment"):
        return None
    found = []
    for box in parse_detections(text, width, height):
        item = {"label": box.label, "box": [round(v, 1) for v in (box.x0, box.y0, box.x1, box.y1)]}
        if box.seg is not None:
            item["segment_codes"] = list(box.seg)
        found.append(item)
    return found


def completion_body(cid: str, model: str, done: Finished, prompt: str, found: list[dict] | None) -> dict:
    message = {"role": "assistant", "content": done.text, "refusal": None}
    if found is not None:
        message["detections"] = found
    return {
        "id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": done.reason, "logprobs": None}],
        "usage": usage(done),
        "system_fingerprint": None,
        "paligemma": {"prompt": prompt, **timings(done)},
    }


def timings(done: Finished) -> dict:
    return {"queue_s": round(done.queue_s, 4), "ttft_s": None if done.ttft_s is None else round(done.ttft_s, 4),
            "total_s": round(done.total_s, 4)}


def chunk(cid: str, model: str, delta: dict, finish_reason: str | None = None, **extra) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}], **extra}


def usage_chunk(cid: str, model: str, done: Finished) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "system_fingerprint": None, "choices": [], "usage": usage(done)}
