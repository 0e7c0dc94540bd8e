"""The ASGI app: OpenAI's routes over a `BatchEngine` (chat) and a SigLIP dual encoder (embeddings).

Routes: `POST /v1/chat/completions`, `POST /v1/embeddings`, `GET /v1/models[/{id}]`, `GET /health`.
Every `/v1` route checks the Bearer key first (when one is set), then reads the body under its size and
time limits, parses it, reads images on worker threads (two at a time, so a burst of large images cannot
hold every core and much memory at once), and only then queues work for the model. Every error is
OpenAI's JSON error shape; an unexpected exception is a 500 for that request, never a dead server.

Clients that go away are noticed while they wait: a streamed answer is cancelled when Starlette sees the
disconnect, a plain one by a task that waits for it; either way the request's batch row is freed at the
next token boundary.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from paligemma_cli.errors import PaliGemmaError
from paligemma_cli.inference.batching import (
    BatchEngine,
    BatchRequest,
    Failed,
    Finished,
    QueueFull,
    ShuttingDown,
    TextDelta,
)
from paligemma_cli.server.chat import (
    chunk,
    completion_body,
    detections,
    new_completion_id,
    parse_chat_request,
    usage_chunk,
)
from paligemma_cli.server.config import ServerConfig
from paligemma_cli.server.embeddings import compute_embeddings, embeddings_body, parse_embeddings_request
from paligemma_cli.server.errors import ApiError, bad_request, error_body
from paligemma_cli.server.images import image_from_url

log = logging.getLogger("paligemma.serve")

IMAGE_DECODERS = 2  # images decoded at once
JSON_IN_THREAD_BYTES = 1 << 20  # parse bodies larger than this off the event loop
BACKSTOP_S = 5.0  # past the engine's own deadline, the handler gives up waiting


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _Gone(Exception):
    """The client disconnected before its request was read."""


class OpenAIServer:
    """The routes' state: limits, the engine, the encoder and the locks between requests."""

    def __init__(self, cfg: ServerConfig, engine: BatchEngine | None, encoder=None, encoder_tokenizer=None):
        if engine is None and encoder is None:
            raise PaliGemmaError("nothing to serve: give a PaliGemma engine, a SigLIP dual encoder, or both")
        self.cfg, self.engine = cfg, engine
        self.encoder, self.encoder_tokenizer = encoder, encoder_tokenizer
        self.started = int(time.time())
        self._decoders = asyncio.Semaphore(IMAGE_DECODERS)
        self._embed_lock = asyncio.Lock()
        self._embed_waiting = 0

    # --- checks shared by the routes ---------------------------------------------------------------

    def authorize(self, request: Request) -> None:
        key = self.cfg.api_key
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(401, "missing or wrong API key: send it as 'Authorization: Bearer KEY'", "invalid_api_key")

    def served(self) -> list[tuple[str, str]]:
        """(model id, kind) pairs."""
        out = []
        if self.engine is not None:
            out.append((self.cfg.model_name, "chat"))
        if self.encoder is not None:
            out.append((self.cfg.embedding_model_name, "embeddings"))
        return out

    def check_model(self, name: str | None, kind: str) -> str:
        """The served model id a request's `model` names (the default one of `kind` when empty)."""
        served = dict(self.served())
        if not name:
            for model, k in served.items():
                if k == kind:
                    return model
        elif served.get(name) == kind:
            return name
        elif name in served:
            other = "/v1/embeddings" if served[name] == "embeddings" else "/v1/chat/completions"
            raise bad_request(f"'{name}' is served for {other}, not here", "model", "wrong_model_kind")
        if name:
            raise ApiError(404, f"model '{name}' is not served here; GET /v1/models lists the ones that are",
                           "model_not_found", "model")
        what = "text generation" if kind == "chat" else "embeddings"
        raise ApiError(404, f"this server has no model for {what}", "model_not_found", "model")

    async def read_json(self, request: Request):
        """The body as JSON, read under the size and time limits."""
        limit = self.cfg.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise bad_request("invalid Content-Length header")
            if int(declared) > limit:
                raise ApiError(413, f"the request body is {declared} bytes; this server accepts at most {limit}",
                               "request_too_large")
        parts, size = [], 0
        try:
            async with asyncio.timeout(self.cfg.body_timeout_s):
                async for part in request.stream():
                    size += len(part)
                    if size > limit:
                        raise ApiError(413, f"the request body is over {limit} bytes, the most this server accepts",
                                       "request_too_large")
                    parts.append(part)
        except TimeoutError:
            raise ApiError(408, "the request body did not arrive in time", "body_timeout") from None
        except ClientDisconnect:
            raise _Gone() from None
        data = b"".join(parts)
        try:
            if len(data) > JSON_IN_THREAD_BYTES:
                return await anyio.to_thread.run_sync(json.loads, data)
            return json.loads(data)
        except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise bad_request("the request body is not valid JSON") from None

    async def read_images(self, urls, pixel_values: bool):
        """The images (PIL) of `urls` and, if asked, their pixel tensor (K, 3, S, S), on a worker thread."""
        def work():
            images = [image_from_url(url, self.cfg) for url in urls]
            if pixel_values:
                return images, self.engine.pipeline.processor.pixel_values(images)
            return images, None

        async with self._decoders:
            return await anyio.to_thread.run_sync(work)

    # --- routes ------------------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        body = {"status": "ok", "models": [m for m, _ in self.served()]}
        if self.engine is not None:
            body["engine"] = self.engine.stats()
        return JSONResponse(body)

    async def models(self, request: Request) -> Response:
        self.authorize(request)
        return JSONResponse({"object": "list", "data": [self._model_card(m) for m, _ in self.served()]})

    async def model(self, request: Request) -> Response:
        self.authorize(request)
        name = request.path_params["model"]
        if name not in dict(self.served()):
            raise ApiError(404, f"model '{name}' is not served here", "model_not_found", "model")
        return JSONResponse(self._model_card(name))

    def _model_card(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": self.started, "owned_by": "paligemma"}

    async def chat_completions(self, request: Request) -> Response:
        arrived = time.monotonic()
        self.authorize(request)
        if self.engine is None:
            self.check_model(None, "chat")  # 404: no model for text generation
        req = parse_chat_request(await self.read_json(request), self.cfg)
        model = self.check_model(req.model, "chat")
        images, pixels = await self.read_images(req.prompt.image_urls, pixel_values=True)
        width, height = images[0].size
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def on_event(event) -> None:  # the engine's thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is closed: the server is gone
                pass

        remaining = max(0.0, self.cfg.request_timeout_s - (time.monotonic() - arrived))
        try:
            ticket = self.engine.submit(BatchRequest(req.prompt.prompt, pixels, req.opts, on_event, req.stop, remaining))
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {e}", "queue_full") from None
        except ShuttingDown:
            raise ApiError(503, "the server is shutting down", "shutting_down") from None
        except PaliGemmaError as e:
            raise bad_request(str(e), "messages") from None
        request.state.log = f"prompt_tokens={ticket.prompt_tokens}"
        cid = new_completion_id()
        ctx = (cid, model, req, width, height, remaining + BACKSTOP_S)
        if req.stream:
            return StreamingResponse(self._stream(request, ticket, events, *ctx), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._complete(request, ticket, events, *ctx)

    async def _complete(self, request, ticket, events, cid, model, req, width, height, wait_s) -> Response:
        gone = asyncio.ensure_future(_disconnected(request))
        answered = False
        try:
            deadline = time.monotonic() + wait_s
            while True:
                get = asyncio.ensure_future(events.get())
                done, _ = await asyncio.wait({get, gone}, timeout=max(0.0, deadline - time.monotonic()),
                                             return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    ticket.cancel()
                    if gone in done:
                        request.state.log += " client_disconnected"
                        return Response(status_code=499)  # nobody reads it
                    raise ApiError(504, "the request took longer than the server's time limit", "request_timeout")
                event = get.result()
                if isinstance(event, TextDelta):
                    continue
                answered = True
                if isinstance(event, Failed):
                    raise ApiError(500, f"the model failed on this request: {event.message}", "generation_failed")
                _raise_unless_answered(event)
                request.state.log += _log_fields(event)
                found = detections(event.text, req.prompt.task, width, height)
                return JSONResponse(completion_body(cid, model, event, req.prompt.prompt, found))
        finally:
            gone.cancel()
            if not answered:  # the handler itself was cancelled (a forced shutdown): free the row
                ticket.cancel()

    async def _stream(self, request, ticket, events, cid, model, req, width, height, wait_s):
        ended = False
        try:
            yield sse(chunk(cid, model, {"role": "assistant", "content": ""}))
            deadline = time.monotonic() + wait_s
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), max(0.0, deadline - time.monotonic()))
                except TimeoutError:
                    yield sse(error_body(504, "the request took longer than the server's time limit", "request_timeout"))
                    return
                if isinstance(event, TextDelta):
                    yield sse(chunk(cid, model, {"content": event.text}))
                    continue
                ended = True
                if isinstance(event, Failed):
                    request.state.log += " failed"
                    yield sse(error_body(500, f"the model failed on this request: {event.message}", "generation_failed"))
                    return
                request.state.log += _log_fields(event)
                try:
                    _raise_unless_answered(event)
                except ApiError as e:
                    yield sse(e.body())
                    return
                found = detections(event.text, req.prompt.task, width, height)
                yield sse(chunk(cid, model, {} if found is None else {"detections": found}, event.reason))
                if req.include_usage:
                    yield sse(usage_chunk(cid, model, event))
                yield "data: [DONE]\n\n"
                return
        finally:
            if not ended:  # the client left, or the wait ran out: free the row now
                ticket.cancel()
                request.state.log += " stream_cut"

    async def embeddings(self, request: Request) -> Response:
        self.authorize(request)
        if self.encoder is None:
            self.check_model(None, "embeddings")  # 404: no model for embeddings
        req = parse_embeddings_request(await self.read_json(request), self.cfg)
        model = self.check_model(req.model, "embeddings")
        dim = self.encoder.config.vision.hidden_size
        if req.dimensions is not None and req.dimensions != dim:
            raise bad_request(f"this model's embeddings have {dim} dimensions", "dimensions")
        if self._embed_waiting >= (self.engine.max_queue if self.engine is not None else 64):
            raise ApiError(429, "the server is busy: too many embedding requests are waiting", "queue_full")
        texts = [x for kind, x in req.items if kind == "text"]
        urls = [x for kind, x in req.items if kind == "image"]
        images = (await self.read_images(urls, pixel_values=False))[0] if urls else []
        self._embed_waiting += 1
        try:
            async with self._embed_lock:  # one batch at a time: bounded memory, whole cores for each
                txt, img, tokens = await anyio.to_thread.run_sync(
                    compute_embeddings, self.encoder, self.encoder_tokenizer, texts, images)
        finally:
            self._embed_waiting -= 1
        it_t, it_i = iter(txt), iter(img)
        vectors = [next(it_t) if kind == "text" else next(it_i) for kind, _ in req.items]
        request.state.log = f"inputs={len(vectors)} tokens={tokens}"
        return JSONResponse(embeddings_body(model, vectors, req.encoding_format, tokens))


def _raise_unless_answered(done: Finished) -> None:
    if done.reason == "timeout":
        raise ApiError(504, "the request took longer than the server's time limit", "request_timeout")
    if done.reason == "cancelled":
        raise ApiError(503, "the request was cancelled: the server is shutting down", "cancelled")


def _log_fields(done: Finished) -> str:
    ttft = "-" if done.ttft_s is None else f"{done.ttft_s:.3f}s"
    return f" completion_tokens={done.completion_tokens} finish={done.reason} ttft={ttft}"


async def _disconnected(request: Request) -> None:
    """Return once the client has gone (the body has been read, so only `http.disconnect` can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _guard(handler):
    """Turn ApiError (and a client gone mid-body) into responses inside the route."""
    async def route(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as e:
            request.state.log = f"error={e.code or e.status}"
            return e.response()
        except _Gone:
            return Response(status_code=499)
    return route


class RequestLog:
    """One stderr line per request: client, method, path, status, seconds, and what the route noted."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [0]

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            client = scope.get("client") or ("-", 0)
            note = scope.get("state", {}).get("log", "")
            log.info("%s %s %s %d %.3fs %s", client[0], scope["method"], scope["path"], status[0] or 500,
                     time.perf_counter() - t0, note)


def create_app(cfg: ServerConfig, engine: BatchEngine | None = None, encoder=None, encoder_tokenizer=None) -> Starlette:
    """The ASGI app. The engine's thread starts with the app (lifespan) and is stopped when it ends."""
    server = OpenAIServer(cfg, engine, encoder, encoder_tokenizer)

    @asynccontextmanager
    async def lifespan(app):
        if engine is not None:
            engine.start()
        try:
            yield
        finally:
            if engine is not None:
                # uvicorn has already let in-flight requests finish for its graceful-shutdown time.
                await anyio.to_thread.run_sync(engine.stop, 0.0)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return JSONResponse(error_body(exc.status_code, message.get(exc.status_code, str(exc.detail))),
                            status_code=exc.status_code)

    async def server_error(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse(error_body(500, "internal server error"), status_code=500)

    routes = [
        Route("/health", server.health, methods=["GET"]),
        Route("/v1/models", _guard(server.models), methods=["GET"]),
        Route("/v1/models/{model:path}", _guard(server.model), methods=["GET"]),
        Route("/v1/chat/completions", _guard(server.chat_completions), methods=["POST"]),
        Route("/v1/embeddings", _guard(server.embeddings), methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, middleware=[Middleware(RequestLog)],
                    exception_handlers={HTTPException: http_error, Exception: server_error})
    app.state.server = server
    return app
