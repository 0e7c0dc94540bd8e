"""The continuous-batching engine: batched answers equal one-at-a-time answers, and its bookkeeping
(queue, cancel, timeouts, stop strings, the image-feature cache) does what it says."""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch
from PIL import Image

from paligemma_cli.errors import PaliGemmaError
from paligemma_cli.inference.batching import (
    BatchEngine,
    BatchRequest,
    Failed,
    Finished,
    QueueFull,
    ShuttingDown,
    StopText,
    TextDelta,
)
from paligemma_cli.inference.generate import SamplingOptions, generate_tokens
from paligemma_cli.inference.pipeline import Pipeline
from tests.fixtures.checkpoints import make_tiny_checkpoint

WORDS = "what is on the table how many dogs are there a red bus cat".split()


def make_tiny_gemma2(folder):
    """Gemma 2 with a sliding window (8 slots) shorter than every prompt, soft-caps and GQA 4:2."""
    return make_tiny_checkpoint(folder, model_type="gemma2", num_attention_heads=4, num_key_value_heads=2,
                                query_pre_attn_scalar=16, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                                sliding_window=8, layer_types=["sliding_attention", "full_attention"])


@pytest.fixture(scope="module", params=["gemma", "gemma2"])
def pipe(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param) / "model"
    folder = make_tiny_checkpoint(folder) if request.param == "gemma" else make_tiny_gemma2(folder)
    return Pipeline.load(folder, "cpu", "fp32")


class Collector:
    """Gathers each request's events; `wait()` returns {index: (streamed text, final event)}."""

    def __init__(self, n: int):
        self.n, self.parts, self.final = n, {i: [] for i in range(n)}, {}
        self.done = threading.Semaphore(0)

    def on(self, i: int):
        def record(event):
            if isinstance(event, TextDelta):
                self.parts[i].append(event.text)
            else:
                self.final[i] = event
                self.done.release()
        return record

    def wait(self, timeout: float = 60) -> dict:
        for _ in range(self.n):
            assert self.done.acquire(timeout=timeout), "a request never finished"
        return {i: ("".join(self.parts[i]), self.final[i]) for i in range(self.n)}


def random_requests(n: int, seed: int = 0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        image = Image.new("RGB", (40, 30), (rng.randrange(256), rng.randrange(256), 200))
        prompt = "answer en " + " ".join(rng.choice(WORDS) for _ in range(rng.randrange(1, 12)))
        out.append((image, prompt, rng.choice([3, 10, 30, 40])))
    return out


def test_batched_answers_equal_one_at_a_time_while_requests_join_leave_and_shift(pipe, monkeypatch):
    requests = random_requests(12)
    expected = [pipe.generate([im], [p], SamplingOptions(max_new_tokens=m))[0] for im, p, m in requests]
    # A small cache (3 rows, 140 slots) makes requests queue, join mid-answer and shift the rows.
    engine = BatchEngine(pipe, max_batch=3, max_new_tokens=40, max_prompt_tokens=60)
    shifts = []
    shift = engine._shift
    monkeypatch.setattr(engine, "_shift", lambda d: (shifts.append(d), shift(d)))
    engine.start()
    got = Collector(len(requests))
    rng = random.Random(1)
    for i, (image, prompt, m) in enumerate(requests):
        engine.submit(BatchRequest(prompt, pipe.processor.pixel_values([image]), SamplingOptions(max_new_tokens=m),
                                   got.on(i)))
        time.sleep(rng.random() * 0.01)
    results = got.wait()
    engine.stop()
    assert [results[i][0] for i in range(len(requests))] == expected
    for i, (_, _, m) in enumerate(requests):
        text, done = results[i]
        assert isinstance(done, Finished) and done.text == text
        assert done.reason in ("stop", "length") and 1 <= done.completion_tokens <= m
        assert (done.reason == "length") == (done.completion_tokens == m)
    assert any(d < 0 for d in shifts), "the test should make the rows shift left"
    assert sum(done.reason == "length" and done.completion_tokens >= 30 for _, done in results.values()) >= 2


def reference_tokens(pipe, images, prompt, opts) -> str:
    """One prompt with several images through the plain model (no engine), as `generate_tokens` runs it."""
    ids = torch.tensor([pipe.processor.prompt_ids(prompt, len(images))])
    batch = {"input_ids": ids, "token_type_ids": torch.zeros_like(ids),
             "pixel_values": pipe.processor.pixel_values(images)}
    tokens = [int(t[0]) for t in generate_tokens(pipe.model, batch, opts, pipe.tokenizer.eos_id)]
    if pipe.tokenizer.eos_id in tokens:
        tokens = tokens[:tokens.index(pipe.tokenizer.eos_id)]
    return pipe.tokenizer.decode(tokens)


def test_two_image_and_seeded_requests_equal_their_reference_in_a_mixed_batch(pipe):
    a, b = Image.new("RGB", (40, 30), (200, 20, 20)), Image.new("RGB", (20, 30), (10, 200, 90))
    cases = [([a, b], "answer en what is on the table", SamplingOptions(max_new_tokens=20)),
             ([b], "caption en", SamplingOptions(max_new_tokens=25, temperature=1.3, top_p=0.9, seed=7)),
             ([a], "detect cat", SamplingOptions(max_new_tokens=15, temperature=0.8, top_k=20, seed=3)),
             ([b, a], "answer en a red bus", SamplingOptions(max_new_tokens=12))]
    expected = [reference_tokens(pipe, images, prompt, opts) for images, prompt, opts in cases]
    engine = BatchEngine(pipe, max_batch=4, max_new_tokens=32).start()
    got = Collector(len(cases))
    for i, (images, prompt, opts) in enumerate(cases):
        engine.submit(BatchRequest(prompt, pipe.processor.pixel_values(images), opts, got.on(i)))
    results = got.wait()
    engine.stop()
    assert [results[i][0] for i in range(len(cases))] == expected
    greedy = reference_tokens(pipe, [b], "caption en", SamplingOptions(max_new_tokens=25))
    assert expected[1] != greedy  # the seeded request really sampled
    assert engine.features.misses == 2  # the vision tower ran once per distinct image (a, b)


def test_stop_strings_cut_the_answer_and_hold_back_their_start():
    text = StopText(("END", "xyz"))
    assert text.add("hello E") == "hello "  # "E" may start "END"
    assert text.add("N") == ""
    assert text.add("D more") == "" and text.stopped and text.text == "hello "
    text = StopText(("END",))
    assert text.add("EN") == "" and text.add("x") == "ENx" and text.finish() == ""
    text = StopText(())
    assert text.add("a") == "a" and text.add("b") == "b" and text.text == "ab"


def test_a_stop_string_ends_the_request_early(pipe):
    image = Image.new("RGB", (40, 30), (1, 2, 3))
    full = pipe.generate([image], ["caption en"], SamplingOptions(max_new_tokens=30))[0]
    assert len(full) > 6
    stop = full[3:6]
    engine = BatchEngine(pipe, max_batch=2, max_new_tokens=32).start()
    got = Collector(1)
    engine.submit(BatchRequest("caption en", pipe.processor.pixel_values([image]), SamplingOptions(max_new_tokens=30),
                               got.on(0), stop=(stop,)))
    text, done = got.wait()[0]
    engine.stop()
    assert text == full[:full.index(stop)] == done.text and done.reason == "stop"


def test_queue_limit_cancel_and_shutdown_without_a_running_loop(pipe):
    engine = BatchEngine(pipe, max_batch=1, max_queue=2, max_new_tokens=8)  # not started: nothing is served
    events = []
    px = pipe.processor.pixel_values([Image.new("RGB", (8, 8))])
    first = engine.submit(BatchRequest("caption en", px, SamplingOptions(max_new_tokens=4), events.append))
    engine.submit(BatchRequest("caption en", px, SamplingOptions(max_new_tokens=4), events.append))
    with pytest.raises(QueueFull):
        engine.submit(BatchRequest("caption en", px, SamplingOptions(max_new_tokens=4), events.append))
    first.cancel()  # a queued request leaves at once and makes room
    assert len(events) == 1 and events[0].reason == "cancelled" and events[0].completion_tokens == 0
    engine.submit(BatchRequest("caption en", px, SamplingOptions(max_new_tokens=4), events.append))
    engine.start()
    engine.stop()  # no grace: what is still queued is cancelled, nothing is left hanging
    finals = [e for e in events if isinstance(e, (Finished, Failed))]
    assert len(finals) == 3 and all(isinstance(e, Finished) for e in finals)
    with pytest.raises(ShuttingDown):
        engine.submit(BatchRequest("caption en", px, SamplingOptions(max_new_tokens=4), events.append))


def test_limits_are_checked_when_submitting(pipe):
    engine = BatchEngine(pipe, max_batch=1, max_new_tokens=8, max_prompt_tokens=40)
    px = pipe.processor.pixel_values([Image.new("RGB", (8, 8))])
    with pytest.raises(PaliGemmaError, match="at most 8"):
        engine.submit(BatchRequest("caption en", px, SamplingOptions(max_new_tokens=9), print))
    with pytest.raises(PaliGemmaError, match="allows at most 40"):
        engine.submit(BatchRequest("answer en " + "cat " * 40, px, SamplingOptions(max_new_tokens=4), print))
    with pytest.raises(PaliGemmaError, match="pixel_values"):
        engine.submit(BatchRequest("caption en", px[0], SamplingOptions(max_new_tokens=4), print))


def test_a_late_request_times_out_and_a_cancelled_one_frees_its_row(pipe):
    engine = BatchEngine(pipe, max_batch=1, max_new_tokens=256).start()
    px = pipe.processor.pixel_values([Image.new("RGB", (8, 8), (9, 9, 9))])
    got = Collector(2)
    long = engine.submit(BatchRequest("caption en", px, SamplingOptions(max_new_tokens=256), got.on(0)))
    engine.submit(BatchRequest("caption en", px, SamplingOptions(max_new_tokens=256), got.on(1), timeout_s=0.0))
    long.cancel()
    results = got.wait()
    engine.stop()
    assert results[0][1].reason == "cancelled" and results[0][1].completion_tokens < 256
    assert results[1][1].reason == "timeout"
    assert engine.rows == []


def test_a_failing_step_fails_only_the_requests_in_flight_and_the_engine_serves_on(pipe, monkeypatch):
    engine = BatchEngine(pipe, max_batch=2, max_new_tokens=8)
    step, calls = engine._step, []
    monkeypatch.setattr(engine, "_step", lambda: (calls.append(1), step() if len(calls) > 1 else 1 / 0))
    engine.start()
    px = pipe.processor.pixel_values([Image.new("RGB", (8, 8), (9, 9, 9))])
    first = Collector(1)
    engine.submit(BatchRequest("caption en", px, SamplingOptions(max_new_tokens=8), first.on(0)))
    (_, failed), = first.wait().values()
    second = Collector(1)
    engine.submit(BatchRequest("caption en", px, SamplingOptions(max_new_tokens=3), second.on(0)))
    (_, done), = second.wait().values()
    engine.stop()
    assert isinstance(failed, Failed) and "division by zero" in failed.message
    assert isinstance(done, Finished) and done.completion_tokens >= 1


def test_when_a_group_prefill_fails_its_requests_are_tried_one_by_one(pipe, monkeypatch):
    requests = random_requests(3, seed=5)
    expected = [pipe.generate([im], [p], SamplingOptions(max_new_tokens=m))[0] for im, p, m in requests]
    engine = BatchEngine(pipe, max_batch=3, max_new_tokens=40)
    prefill, sizes = engine._prefill, []

    def only_alone(group, T):
        sizes.append(len(group))
        if len(group) > 1:
            raise RuntimeError("no batches today")
        return prefill(group, T)

    monkeypatch.setattr(engine, "_prefill", only_alone)
    got = Collector(3)
    for i, (image, prompt, m) in enumerate(requests):  # queued before the loop starts: admitted as one group
        engine.submit(BatchRequest(prompt, pipe.processor.pixel_values([image]), SamplingOptions(max_new_tokens=m),
                                   got.on(i)))
    engine.start()
    results = got.wait()
    engine.stop()
    assert sizes[0] == 3 and sizes[1:] == [1, 1, 1]
    assert [results[i][0] for i in range(3)] == expected
