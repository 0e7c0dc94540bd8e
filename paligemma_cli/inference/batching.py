"""Continuous batching: one model, one decode loop, requests joining and leaving at token boundaries.

References: Yu et al., "Orca: a distributed serving system for transformer-based generative models"
(OSDI 2022) for iteration-level scheduling; vLLM's scheduler and text-generation-inference's router for
the queue, the per-request sampling and the stop strings.

One `BatchEngine` owns the model and a KV cache of `max_batch` rows, allocated once. Its thread runs:

    admit waiting requests into free rows -> drop cancelled or late rows -> one decode step for all rows

Requests admitted at the same boundary are prefilled together, left-padded, in a cache of their own
(one request alone takes exactly `Pipeline.generate`'s path for one prompt); the images among them that
the feature cache does not hold go through the vision tower in one batch. Each prompt's keys and values
are then copied into a free row so that they end at the batch's write slot `length`; the row's earlier
slots are marked invalid. Every row keeps its own RoPE positions (`KVCache.next_pos`), and the prefix-LM
mask only compares slots within a row, so rows never see each other and slot offsets do not change the
math. Rows in use are kept first (rows [0, n)): a decode step runs the model on a view of those rows
only, and a row that leaves is filled by moving the last row into it. When requests join, and when the
write slot reaches the end of the cache, the rows' slots are shifted so that the earliest one used is 0.

The cache holds `capacity = max_prompt_tokens + 2 * max_new_tokens` slots. That is always enough: a row
still running at slot L started at most `P_old + M_old` slots before it, and a newcomer needs at most
`M_new` after it. Identical images share their vision-tower features through a content-hash cache
(`FeatureCache`): a hit gives the very tensor computed before. Nothing else is shared between requests,
so an answer depends on its neighbours at most through the floating-point rounding of batched matmuls
(none was seen on this project's test CPUs: batched and one-at-a-time greedy answers are identical).
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from paligemma_cli.errors import PaliGemmaError
from paligemma_cli.inference.generate import SamplingOptions, sample
from paligemma_cli.inference.pipeline import Pipeline
from paligemma_cli.model.kv_cache import KVCache

log = logging.getLogger("paligemma.serve")


# --- what callers see ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextDelta:
    """New answer text (never part of a stop string)."""

    text: str


@dataclass(frozen=True)
class Finished:
    """The request is over. `reason`: "stop" (eos or a stop string), "length" (max_new_tokens),
    "cancelled" (by the caller or a shutdown) or "timeout"."""

    reason: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    queue_s: float
    ttft_s: float | None
    total_s: float


@dataclass(frozen=True)
class Failed:
    """The engine could not serve the request (an internal error, not the caller's input)."""

    message: str


Event = TextDelta | Finished | Failed


class QueueFull(PaliGemmaError):
    """Too many requests are waiting; the caller should retry later."""


class ShuttingDown(PaliGemmaError):
    """The engine no longer takes requests."""


@dataclass
class BatchRequest:
    """One generation: a raw PaliGemma prefix, its images and its own sampling settings.

    Args:
        prompt: the prefix, e.g. "caption en" or "answer en what is this?".
        pixel_values: (K, 3, S, S) float32, K >= 1 images as `PaliGemmaProcessor.pixel_values` makes them;
            their `<image>` blocks come one after the other before `<bos>`.
        opts: sampling settings (`seed` gives the request its own generator).
        stop: strings that end the answer; the answer stops before the first of them.
        timeout_s: the most seconds from submission to the last token (None: no limit).
        on_event: called from the engine's thread with each `TextDelta`, then one `Finished` or `Failed`.
            It must return quickly and not raise.
    """

    prompt: str
    pixel_values: torch.Tensor
    opts: SamplingOptions
    on_event: Callable[[Event], None]
    stop: tuple[str, ...] = ()
    timeout_s: float | None = None


@dataclass
class Ticket:
    """The caller's handle on a submitted request."""

    id: int
    prompt_tokens: int
    _engine: "BatchEngine" = field(repr=False)

    def cancel(self) -> None:
        """Free the request's row at the next token boundary (at once if it is still queued). Idempotent."""
        self._engine._cancel(self.id)


# --- pieces -------------------------------------------------------------------------------------------


class FeatureCache:
    """Projected vision-tower features per image, keyed by a hash of its pixel tensor, least recently used
    evicted first. Features depend on the pixels only, so a hit gives exactly what the tower would."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self._items: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()
        self.hits = self.misses = 0

    @staticmethod
    def key(pixels: torch.Tensor) -> str:
        return hashlib.sha256(pixels.contiguous().numpy().tobytes()).hexdigest()

    def get(self, key: str) -> torch.Tensor | None:
        feats = self._items.get(key)
        if feats is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return feats

    def put(self, key: str, feats: torch.Tensor) -> None:
        size = feats.numel() * feats.element_size()
        if size > self.max_bytes:
            return
        self._items[key] = feats
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()


class StopText:
    """Answer text with stop strings: what may be sent now, and where the answer ends.

    Text that could still turn into a stop string is held back until it cannot, so a client never sees
    the start of a stop string (as OpenAI's API behaves).
    """

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.text = ""
        self.sent = 0
        self.stopped = False

    def add(self, piece: str) -> str:
        """Append `piece`; return the text that is now safe to send ("" when there is none)."""
        if self.stopped or not piece:
            return ""
        self.text += piece
        # A stop string can only start in the part not yet sent (held back text included).
        cut = min((i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = self.text[:cut], True
            return self._send(cut)
        hold = max((k for s in self.stops for k in range(min(len(s) - 1, len(self.text) - self.sent), 0, -1)
                    if self.text.endswith(s[:k])), default=0)
        return self._send(len(self.text) - hold)

    def finish(self) -> str:
        """The held-back rest, once no more text will come."""
        return self._send(len(self.text))

    def _send(self, end: int) -> str:
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out


@dataclass
class _Job:
    """A request's state in the engine: queued, then in a row."""

    id: int
    request: BatchRequest
    ids: list[int]
    submitted: float
    deadline: float | None
    cancelled: bool = False
    # Once in a row:
    start: int = 0  # first cache slot of the prompt
    end: int = 0  # one past the last slot it may need
    last_token: int = 0
    generated: int = 0
    first_token_s: float | None = None
    generator: torch.Generator | None = None
    decoder: object = None  # the tokenizer's StreamDecoder
    text: StopText | None = None
    admitted: float = 0.0
    finish_reason: str | None = None


# --- the engine ---------------------------------------------------------------------------------------


class BatchEngine:
    """Serves `BatchRequest`s from a thread of its own, decoding every admitted request in one batch.

    Args:
        pipeline: the loaded model, tokenizer and processor (its eager model is used, not `--compile`).
        max_batch: rows decoded together; more requests wait in the queue.
        max_queue: requests that may wait; `submit` raises `QueueFull` beyond.
        max_prompt_tokens: the longest prompt (image blocks included) a request may have.
        max_new_tokens: the most tokens a request may ask for.
        feature_cache_mb: memory for vision features of recent images (0: no reuse).

    Example:
        engine = BatchEngine(Pipeline.load("runs/demo")).start()
        ticket = engine.submit(BatchRequest("caption en", pixels, SamplingOptions(), on_event=print))
        ...
        engine.stop(grace_s=10)
    """

    def __init__(self, pipeline: Pipeline, max_batch: int = 8, max_queue: int = 64, max_prompt_tokens: int = 1024,
                 max_new_tokens: int = 256, feature_cache_mb: float = 256):
        if max_batch < 1 or max_queue < 0 or max_new_tokens < 1 or max_prompt_tokens < 2:
            raise PaliGemmaError("max_batch and max_new_tokens must be at least 1, max_queue at least 0")
        self.pipeline = pipeline
        self.model = pipeline.model
        self.tokenizer = pipeline.tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        limit = self.model.config.text.max_position_embeddings
        self.max_new_tokens = min(max_new_tokens, limit - 1)
        self.max_prompt_tokens = min(max_prompt_tokens, limit - self.max_new_tokens)
        self.capacity = self.max_prompt_tokens + 2 * self.max_new_tokens
        # RoPE positions of a row stay below its prompt plus its answer: one table size for every step.
        self.pos_bound = self.max_prompt_tokens + self.max_new_tokens + 2
        self.features = FeatureCache(int(feature_cache_mb * 2**20))
        self.cache = self.model.new_cache(max_batch, self.capacity)
        self.rows: list[_Job] = []
        self.length = 0  # the batch's write slot: every row's next token goes here
        self._waiting: collections.deque[_Job] = collections.deque()
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._cancelled: set[int] = set()
        self._accepting = True
        self._halt = False
        self._thread: threading.Thread | None = None
        self.completed = 0
        self.steps = 0

    # --- the caller's side (any thread) ------------------------------------------------------------

    def start(self) -> "BatchEngine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="paligemma-batching", daemon=True)
            self._thread.start()
        return self

    def prompt_ids(self, prompt: str, num_images: int) -> list[int]:
        return self.pipeline.processor.prompt_ids(prompt, num_images)

    def submit(self, request: BatchRequest) -> Ticket:
        """Queue `request`. Raises PaliGemmaError for a prompt or max_new_tokens over the limits, `QueueFull`
        when `max_queue` requests already wait, `ShuttingDown` after `stop`."""
        opts = request.opts.validate()
        if opts.max_new_tokens > self.max_new_tokens:
            raise PaliGemmaError(f"max_tokens is {opts.max_new_tokens}; this server allows at most {self.max_new_tokens}")
        pixels = request.pixel_values
        size = self.model.config.image_size
        if pixels.ndim != 4 or pixels.shape[0] < 1 or tuple(pixels.shape[1:]) != (3, size, size):
            raise PaliGemmaError(f"pixel_values must be (K, 3, {size}, {size}) with K >= 1, got {tuple(pixels.shape)}")
        ids = self.prompt_ids(request.prompt, pixels.shape[0])
        if len(ids) > self.max_prompt_tokens:
            raise PaliGemmaError(f"the prompt is {len(ids)} tokens (images included); this server allows at most "
                                 f"{self.max_prompt_tokens}")
        now = time.monotonic()
        deadline = now + request.timeout_s if request.timeout_s is not None else None
        with self._cond:
            if not self._accepting:
                raise ShuttingDown("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting; try again later")
            job = _Job(next(self._ids), request, ids, now, deadline)
            self._waiting.append(job)
            self._cond.notify()
        return Ticket(job.id, len(ids), self)

    def _cancel(self, job_id: int) -> None:
        with self._cond:
            for job in self._waiting:
                if job.id == job_id:
                    self._waiting.remove(job)
                    self._finish_queued(job, "cancelled")
                    return
            self._cancelled.add(job_id)
            self._cond.notify()

    def stats(self) -> dict:
        with self._cond:
            return {"running": len(self.rows), "waiting": len(self._waiting), "completed": self.completed,
                    "max_batch": self.max_batch, "max_queue": self.max_queue,
                    "image_cache": {"hits": self.features.hits, "misses": self.features.misses}}

    def idle(self) -> bool:
        with self._cond:
            return not self.rows and not self._waiting

    def stop(self, grace_s: float = 0.0) -> None:
        """Take no more requests, let running and queued ones finish for up to `grace_s` seconds, then
        cancel what is left and end the thread."""
        with self._cond:
            self._accepting = False
            self._cond.notify()
        deadline = time.monotonic() + grace_s
        while not self.idle() and time.monotonic() < deadline and self._thread is not None:
            time.sleep(0.02)
        with self._cond:
            self._halt = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    # --- the engine's thread ------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._halt and not self._waiting and not self.rows:
                        self._cond.wait()
                    if self._halt:
                        break
                    cancelled, self._cancelled = self._cancelled, set()
                    self._expire_queued()
                    admit = []
                    while self._waiting and len(self.rows) + len(admit) < self.max_batch:
                        admit.append(self._waiting.popleft())
                try:
                    self._iterate(admit, cancelled)
                except Exception as e:  # a bug must cost the requests in flight, not the server
                    log.exception("the batch loop failed; failing the %d running requests", len(self.rows))
                    with self._cond:
                        requeued = set(map(id, self._waiting))
                    for job in self.rows + [job for job in admit if id(job) not in requeued]:
                        self._fail(job, f"internal error: {e}")
                    self.rows.clear()
            with self._cond:
                leftover = list(self._waiting)
                self._waiting.clear()
            for job in leftover:
                self._finish_queued(job, "cancelled")
            for job in self.rows:
                job.cancelled = True
            self._retire()

    def _iterate(self, admit: list[_Job], cancelled: set[int]) -> None:
        """One pass of the loop: mark cancelled rows, admit `admit` (or queue them again), retire, step."""
        for job in self.rows:
            if job.id in cancelled:
                job.cancelled = True
        for job in [job for job in admit if job.id in cancelled]:
            self._finish_queued(job, "cancelled")
        rest = self._admit([job for job in admit if job.id not in cancelled])
        with self._cond:  # no room in the cache for these yet: back to the front of the queue
            self._waiting.extendleft(reversed(rest))
        self._retire()
        if self.rows:
            self._step()

    def _expire_queued(self) -> None:
        now = time.monotonic()
        late = [job for job in self._waiting if job.deadline is not None and now > job.deadline]
        for job in late:
            self._waiting.remove(job)
            self._finish_queued(job, "timeout")

    def _finish_queued(self, job: _Job, reason: str) -> None:
        now = time.monotonic()
        self._emit(job, Finished(reason, "", len(job.ids), 0, now - job.submitted, None, now - job.submitted))

    def _fail(self, job: _Job, message: str) -> None:
        """End `job` with `Failed`, once (a job that already finished is left alone)."""
        if job.finish_reason is None:
            job.finish_reason = "failed"
            self._emit(job, Failed(message))

    @staticmethod
    def _emit(job: _Job, event: Event) -> None:
        try:
            job.request.on_event(event)
        except Exception:  # a caller's callback must not stop the batch
            log.exception("request %d: event callback failed", job.id)

    # Admission: prefill together, then move into free rows ---------------------------------------------

    def _admit(self, jobs: list[_Job]) -> list[_Job]:
        """Prefill as many of `jobs` as the cache has room for, in one batch, and give each a row (their first
        tokens go out). Returns the jobs that must wait for room; a group whose prefill fails is failed."""
        group = []
        for job in jobs:
            if not self._fits(group + [job]):
                break
            group.append(job)
        if not group:
            return jobs
        T = max(len(job.ids) for job in group)
        self._make_room(T, group)
        now = time.monotonic()
        for job in group:
            job.admitted = now
        try:
            one = self._prefill(group, T)
        except Exception as e:
            if len(group) > 1 and all(job.decoder is None for job in group):
                # One request's trouble must not fail its neighbours: each is tried again alone.
                log.warning("prefill of %d requests failed (%s); trying them one by one", len(group), e)
                return [left for job in group for left in self._admit([job])] + jobs[len(group):]
            log.exception("prefill failed")
            for job in group:
                self._fail(job, f"prefill failed: {e}")
            return jobs[len(group):]
        L, c = self.length, self.cache
        for b, job in enumerate(group):
            r = len(self.rows)
            for layer in range(len(c.k)):
                c.k[layer][r, :, L - T:L] = one.k[layer][b]
                c.v[layer][r, :, L - T:L] = one.v[layer][b]
            c.valid[r] = False
            c.prefix[r] = False
            c.valid[r, L - T:L] = one.valid[b]  # left padding stays invalid
            c.prefix[r, L - T:L] = one.prefix[b]
            c.next_pos[r] = one.next_pos[b]
            job.start, job.end = L - T, L + job.request.opts.max_new_tokens
            self.rows.append(job)  # a job already done (eos first) leaves again at the next `_retire`
        return jobs[len(group):]

    def _fits(self, group: list[_Job]) -> bool:
        """Whether the rows and `group`, prefilled to end at the write slot, fit in the cache's slots."""
        T = max(len(job.ids) for job in group)
        M = max(job.request.opts.max_new_tokens for job in group)
        if not self.rows:
            return T + M <= self.capacity
        lo = min(min(job.start for job in self.rows), self.length - T)
        hi = max(max(job.end for job in self.rows), self.length + M)
        return hi - lo <= self.capacity

    def _make_room(self, T: int, group: list[_Job]) -> None:
        """Put the write slot where T prompt slots end, shifting the rows so the earliest used slot is 0."""
        if not self.rows:
            self.length = T
            return
        self._shift(-min(min(job.start for job in self.rows), self.length - T))

    def _prefill(self, group: list[_Job], T: int) -> KVCache:
        """The group's prompts, left-padded to T, in a cache of their own; first tokens sampled and sent.

        Vision features come per image from the cache, or from the tower for the images not in it."""
        model, dev, B = self.model, self.model.device, len(group)
        feats = self._features([px for job in group for px in job.request.pixel_values])  # (sum K*N, D)
        ids = torch.full((B, T), self.tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros(B, T, dtype=torch.long)
        for b, job in enumerate(group):
            ids[b, T - len(job.ids):] = torch.tensor(job.ids)
            mask[b, T - len(job.ids):] = 1
        ids = ids.to(dev)
        padded = bool((mask == 0).any())
        one = model.new_cache(B, T)
        # Without padding no mask is passed: one prompt alone takes exactly `Pipeline.generate`'s path.
        logits = model.extend(one, ids, token_type_ids=torch.zeros_like(ids),
                              attention_mask=mask.to(dev) if padded else None, image_features=feats[None])
        for b, job in enumerate(group):
            opts = job.request.opts
            if opts.seed is not None:
                job.generator = torch.Generator(device=dev).manual_seed(opts.seed)
            job.decoder = self.tokenizer.stream()
            job.text = StopText(job.request.stop)
            token = int(sample(logits[b:b + 1], opts, job.generator)[0])
            job.first_token_s = time.monotonic() - job.submitted
            self._advance(job, token)
        return one

    def _features(self, images: list[torch.Tensor]) -> torch.Tensor:
        """(K, 3, S, S) images -> (K * N, D) projected features: cached ones reused, the distinct others
        computed by the vision tower in one batch."""
        keys = [FeatureCache.key(px) for px in images]
        found = {key: self.features.get(key) for key in dict.fromkeys(keys)}
        todo = [key for key, feats in found.items() if feats is None]
        if todo:
            first = {key: px for key, px in zip(reversed(keys), reversed(images))}
            pixels = torch.stack([first[key] for key in todo]).to(self.model.device)
            for key, feats in zip(todo, self.model.image_features(pixels)):
                found[key] = feats.clone()  # not a view that would keep the whole batch alive in the cache
                self.features.put(key, found[key])
        return torch.cat([found[key] for key in keys], dim=0)

    def _shift(self, d: int) -> None:
        """Move every row's used slots by d (left when d < 0); positions live in `next_pos`, so the rows'
        keys, values and mask are unchanged by the move."""
        if d == 0:
            return
        n, L, c = len(self.rows), self.length, self.cache
        lo = min(job.start for job in self.rows)
        src, dst = slice(lo, L), slice(lo + d, L + d)
        for t in (*c.k, *c.v):
            t[:n, :, dst] = t[:n, :, src].clone()
        for flags in (c.valid, c.prefix):
            moved = flags[:n, src].clone()
            flags[:n] = False
            flags[:n, dst] = moved
        for job in self.rows:
            job.start += d
            job.end += d
        self.length += d

    # Decoding ----------------------------------------------------------------------------------------

    def _step(self) -> None:
        """One token for every row."""
        n = len(self.rows)
        if self.length >= self.capacity:
            self._shift(-min(job.start for job in self.rows))
        c = self.cache
        view = KVCache(k=[t[:n] for t in c.k], v=[t[:n] for t in c.v], valid=c.valid[:n], prefix=c.prefix[:n],
                       next_pos=c.next_pos[:n], length=self.length, pos_bound=self.pos_bound)
        tokens = torch.tensor([[job.last_token] for job in self.rows], device=self.model.device)
        try:
            logits = self.model.extend(view, tokens)  # (n, vocab)
        except Exception as e:
            log.exception("decode step failed; failing the %d running requests", n)
            for job in self.rows:
                self._fail(job, f"decode step failed: {e}")
            self.rows.clear()
            return
        self.length = view.length
        self.steps += 1
        greedy = logits.argmax(-1)
        for i, job in enumerate(self.rows):
            if job.request.opts.temperature > 0:
                greedy[i] = sample(logits[i:i + 1], job.request.opts, job.generator)[0]
        for job, token in zip(self.rows, greedy.tolist()):  # the one host sync per step
            self._advance(job, token)
        self._retire()

    def _advance(self, job: _Job, token: int) -> None:
        """Take `token` as the job's next one: its text goes out, and eos, a stop string or the length limit
        marks the job done (it leaves at `_retire`)."""
        job.last_token = token
        if token == self.tokenizer.eos_id:
            self._done(job, "stop")
            return
        job.generated += 1
        out = job.text.add(job.decoder.push(token))
        if out:
            self._emit(job, TextDelta(out))
        if job.text.stopped:
            self._done(job, "stop")
        elif job.generated >= job.request.opts.max_new_tokens:
            self._done(job, "length")

    def _done(self, job: _Job, reason: str) -> None:
        if reason in ("stop", "length") and not job.text.stopped:
            rest = job.text.add(job.decoder.flush())
            rest += "" if job.text.stopped else job.text.finish()
            if rest:
                self._emit(job, TextDelta(rest))
        now = time.monotonic()
        self._emit(job, Finished(reason, job.text.text, len(job.ids), job.generated, job.admitted - job.submitted,
                                 job.first_token_s, now - job.submitted))
        job.finish_reason = reason
        self.completed += 1

    def _retire(self) -> None:
        """Free the rows of finished, cancelled and late jobs, moving the last rows into the gaps."""
        now = time.monotonic()
        for i in range(len(self.rows) - 1, -1, -1):
            job = self.rows[i]
            if job.finish_reason is None:
                if job.cancelled:
                    self._done(job, "cancelled")
                elif job.deadline is not None and now > job.deadline:
                    self._done(job, "timeout")
                else:
                    continue
            self._free_row(i)

    def _free_row(self, i: int) -> None:
        last = len(self.rows) - 1
        if i != last:
            c, L = self.cache, self.length
            lo = self.rows[last].start
            for t in (*c.k, *c.v):
                t[i, :, lo:L] = t[last, :, lo:L]
            for flags in (c.valid, c.prefix):
                flags[i] = flags[last]
            c.next_pos[i] = c.next_pos[last]
            self.rows[i] = self.rows[last]
        self.rows.pop()
