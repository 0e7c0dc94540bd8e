"""What a request may ask of the server: the limits and switches `paligemma serve` sets.

Every limit has a default that keeps one hostile client from taking the machine: bodies, images, their
pixels, the tokens a request asks for, the queue and the time a request may take are all bounded, and
nothing is read from disk or from the network unless the operator allowed it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

ENV_API_KEY = "PALIGEMMA_API_KEY"


@dataclass
class ServerConfig:
    """Limits and switches of one server.

    model_name / embedding_model_name: the ids `/v1/models` lists and requests name (None: not served).
    api_key: the Bearer token every `/v1` request must carry (None: no check; loopback only).
    lang: the language code of `answer {lang} …` prompts made from plain questions.
    max_body_bytes: the largest request body; bigger ones get 413 before they are read.
    max_image_pixels: width x height of the largest image accepted (413 above).
    max_images: images in one request.
    max_tokens: the most new tokens a request may ask for (also the default when it asks for none).
    max_prompt_chars: the longest prompt text, before tokenizing.
    request_timeout_s: from arrival to the last token; a late request ends with 504 (or an error event).
    body_timeout_s: the time a client has to send its body.
    allow_files: a folder whose files image URLs may name (`file://` or a path); None: no files.
    allow_remote: fetch http(s) image URLs (off: the server never connects anywhere itself).
    remote_timeout_s: per remote image.
    """

    model_name: str | None = "paligemma"
    embedding_model_name: str | None = None
    api_key: str | None = None
    lang: str = "en"
    max_body_bytes: int = 20 * 2**20
    max_image_pixels: int = 25_000_000
    max_images: int = 4
    max_tokens: int = 256
    max_prompt_chars: int = 4000
    request_timeout_s: float = 300.0
    body_timeout_s: float = 30.0
    allow_files: Path | None = None
    allow_remote: bool = False
    remote_timeout_s: float = 10.0


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1): only this machine can connect."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a hostname other than localhost may resolve to anything
