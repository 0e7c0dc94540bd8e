"""`paligemma serve`: an OpenAI-compatible HTTP server with continuous batching (needs the `serve` extra).

Wiring only: check the options, load the model(s), bind the socket, run uvicorn on `server.create_app`.
The batching engine lives in `inference/batching.py`, the HTTP side in `server/`; docs/serve.md says how
to use it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from paligemma_cli.options import DeviceOpt, DtypeOpt, LangOpt, ModelOpt, QuantizeOpt

SERVE_EXTRA = 'pip install "paligemma-cli[serve]"'
# Prompt text tokens a request may add to its image blocks (the cache is sized for this).
MAX_TEXT_TOKENS = 1024


def serve(
    model: ModelOpt = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on. Anything but a loopback address "
                                      "needs --api-key.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="TCP port (0: any free one).")] = 8000,
    api_key: Annotated[Optional[str], typer.Option(
        "--api-key", envvar="PALIGEMMA_API_KEY", show_envvar=True,
        help="Require 'Authorization: Bearer KEY' on every /v1 request.")] = None,
    embedding_model: Annotated[Optional[str], typer.Option(
        "--embedding-model", help="Also serve /v1/embeddings with this SigLIP dual encoder (folder or hub id).",
        show_default=False)] = None,
    model_name: Annotated[Optional[str], typer.Option(
        "--model-name", help="The id clients use for the model. Default: the hub id or folder name.",
        show_default=False)] = None,
    lang: LangOpt = "en",
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, max=256, help="Requests decoded together.")] = 8,
    max_queue: Annotated[int, typer.Option("--max-queue", min=0, help="Requests that may wait; more get 429.")] = 64,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, help="Most new tokens a request may ask for (and "
                                            "its default).")] = 256,
    max_images: Annotated[int, typer.Option("--max-images", min=1, help="Images per request.")] = 4,
    max_image_pixels: Annotated[int, typer.Option("--max-image-pixels", min=1, help="Width x height of the largest "
                                                  "image accepted.")] = 25_000_000,
    max_body_mb: Annotated[float, typer.Option("--max-body-mb", min=0.001, help="Largest request body, MiB.")] = 20.0,
    request_timeout: Annotated[float, typer.Option("--request-timeout", min=0.1, help="Seconds a request may take "
                                                   "from arrival to its last token.")] = 300.0,
    grace: Annotated[float, typer.Option("--grace", min=0.0, help="On SIGTERM or Ctrl+C, seconds running requests "
                                         "get to finish before they are cancelled.")] = 30.0,
    allow_files: Annotated[Optional[Path], typer.Option(
        "--allow-files", help="Let image URLs name files (file:// or paths) inside this folder. Off by default.",
        show_default=False)] = None,
    allow_remote_images: Annotated[bool, typer.Option(
        "--allow-remote-images", help="Fetch http(s) image URLs. Off by default: the server then never "
                                      "connects to other hosts.")] = False,
    image_cache_mb: Annotated[float, typer.Option("--image-cache-mb", min=0.0, help="Memory for the vision "
                                                  "features of recent images (identical images skip the vision "
                                                  "tower).")] = 256.0,
    fast_layout: Annotated[bool, typer.Option("--fast-layout/--no-fast-layout", help="Give the weights the "
                                              "CPU's fastest layout at load (seconds once; faster decoding).")] = True,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="CPU threads for the model's math. "
                                                   "Default: torch's (one per core).", show_default=False)] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = "none",
) -> None:
    """Serve a model over HTTP with OpenAI's API: chat completions (streamed or not), models, embeddings.

    Concurrent requests are decoded together in one batch (continuous batching). The server binds to
    127.0.0.1 by default; any other address needs an API key. Request logs go to stderr.

    Examples:

      paligemma serve

      paligemma serve --model google/paligemma2-3b-mix-224 --port 8080 --max-batch 8

      PALIGEMMA_API_KEY=secret paligemma serve --host 0.0.0.0 --dtype bf16

      paligemma serve --embedding-model runs/siglip --allow-files ~/pictures

      curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "paligemma-demo", "messages": [{"role": "user", "content": [{"type": "text",
        "text": "caption en"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}]}]}'
    """
    from paligemma_cli.errors import PaliGemmaError

    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise PaliGemmaError(f"`paligemma serve` needs the serve extra: {SERVE_EXTRA}") from None
    import signal
    import socket

    from paligemma_cli.commands.common import stderr_console
    from paligemma_cli.server.config import is_loopback

    api_key = api_key or None
    if not is_loopback(host) and not api_key:
        raise PaliGemmaError(f"--host {host} lets other machines connect: set an API key with --api-key or "
                             "PALIGEMMA_API_KEY")
    if allow_files is not None and not allow_files.expanduser().is_dir():
        raise PaliGemmaError(f"--allow-files {allow_files}: no such folder")
    console = stderr_console()
    sock = _bind(socket, host, port)  # before loading: a port in use should not wait for the model
    # A stop while loading ends the command at once; once serving, uvicorn drains requests first and then
    # re-raises the signal, which the recording handler swallows so that a requested stop exits 0.
    previous = {sig: signal.signal(sig, _stop_now) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        app, names = _load_app(model, embedding_model, model_name, device, dtype, quantize, fast_layout, console,
                               max_batch=max_batch, max_queue=max_queue, max_tokens=max_tokens,
                               max_images=max_images, image_cache_mb=image_cache_mb, api_key=api_key, lang=lang,
                               max_body_bytes=int(max_body_mb * 2**20), max_image_pixels=max_image_pixels,
                               request_timeout_s=request_timeout, allow_remote=allow_remote_images,
                               allow_files=allow_files.expanduser().resolve() if allow_files else None)
        _log_to_stderr()
        bound_host, bound_port = sock.getsockname()[:2]
        url_host = f"[{bound_host}]" if ":" in bound_host else bound_host
        console.print(f"serving {names} on http://{url_host}:{bound_port}/v1 (batch {max_batch}, queue {max_queue}"
                      f"{', API key required' if api_key else ''}); Ctrl+C or SIGTERM stops", markup=False,
                      soft_wrap=True)
        config = uvicorn.Config(app, log_config=None, access_log=False, timeout_graceful_shutdown=grace,
                                server_header=False, limit_concurrency=4 * (max_queue + max_batch) + 32)
        server = uvicorn.Server(config)
        for sig in previous:
            signal.signal(sig, lambda s, f: None)
        server.run(sockets=[sock])
    except _Stopped:
        console.print("stopped before serving", markup=False)
        return
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
    if not server.started:
        raise PaliGemmaError("the server did not start (see the log above)")
    console.print("stopped", markup=False)


class _Stopped(Exception):
    """SIGINT or SIGTERM arrived before the server was up."""


def _stop_now(sig, frame):
    raise _Stopped()


def _load_app(model, embedding_model, model_name, device, dtype, quantize, fast_layout, console, *, max_batch,
              max_queue, max_tokens, max_images, image_cache_mb, **limits):
    """The ASGI app over the loaded model(s), and the served names for the log."""
    from paligemma_cli.commands.common import load_dual_encoder, load_pipeline
    from paligemma_cli.errors import PaliGemmaError
    from paligemma_cli.inference.batching import BatchEngine
    from paligemma_cli.server.app import create_app
    from paligemma_cli.server.config import ServerConfig
    from paligemma_cli.settings import resolve_model

    folder = resolve_model(model)
    chat_folder = None if _is_dual_encoder(folder) else folder
    if chat_folder is None and embedding_model:
        raise PaliGemmaError("--model is already a SigLIP dual encoder; --embedding-model is for serving one "
                             "beside a PaliGemma")
    embed_spec = embedding_model if embedding_model else (model if chat_folder is None else None)
    engine = encoder = tokenizer = None
    if chat_folder is not None:
        pipe = load_pipeline(model, device, dtype, console, quantize=quantize, fast_layout=fast_layout)
        engine = BatchEngine(pipe, max_batch=max_batch, max_queue=max_queue, max_new_tokens=max_tokens,
                             max_prompt_tokens=max_images * pipe.model.config.num_image_tokens + 1 + MAX_TEXT_TOKENS,
                             feature_cache_mb=image_cache_mb)
    if embed_spec is not None:
        encoder, tokenizer, _ = load_dual_encoder(embed_spec, device, dtype, console)
    cfg = ServerConfig(
        model_name=(model_name or _served_name(model, chat_folder)) if engine is not None else None,
        embedding_model_name=_served_name(embed_spec, resolve_model(embed_spec)) if encoder is not None else None,
        max_images=max_images, max_tokens=max_tokens, **limits)
    if engine is None and model_name:
        cfg.embedding_model_name = model_name
    if engine is not None and cfg.model_name == cfg.embedding_model_name:
        cfg.embedding_model_name += "-embeddings"
    names = ", ".join(n for n in (cfg.model_name, cfg.embedding_model_name) if n)
    return create_app(cfg, engine, encoder, tokenizer), names


def _bind(socket, host: str, port: int):
    from paligemma_cli.errors import PaliGemmaError

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise PaliGemmaError(f"cannot listen on {host}:{port}: {e.strerror or e}; pick another --port or --host") from None
    sock.set_inheritable(True)
    return sock


def _is_dual_encoder(folder: Path) -> bool:
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type") == "siglip"
    except (OSError, ValueError):
        return False  # the loader will say what is wrong with it


def _served_name(spec: str | None, folder: Path) -> str:
    from paligemma_cli.settings import DEMO_MODEL

    if folder.resolve() == DEMO_MODEL.resolve():
        return "paligemma-demo"
    if spec and not Path(spec).expanduser().exists() and "/" in spec:
        return spec  # a hub id
    return folder.resolve().name


def _log_to_stderr() -> None:
    import logging
    import sys

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    for name in ("paligemma.serve", "uvicorn"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(logging.INFO)
        logger.propagate = False
