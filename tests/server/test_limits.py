"""Hostile and broken requests get OpenAI-shaped errors with the right status, and the server keeps serving:
keys, body and image limits, a full queue, malformed input, files and remote URLs, cancelled streams, time."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from PIL import Image

from paligemma_cli.inference.batching import BatchEngine, Finished
from paligemma_cli.inference.generate import SamplingOptions
from paligemma_cli.inference.pipeline import Pipeline
from paligemma_cli.server.app import create_app
from paligemma_cli.server.config import ServerConfig
from tests.fixtures.checkpoints import make_tiny_checkpoint
from tests.fixtures.server import ServerThread, data_url, user_message

KEY = "s3cret"
AUTH = {"Authorization": f"Bearer {KEY}"}
LONG = 200  # tokens of the long answers below


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return Pipeline.load(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model"), "cpu", "fp32")


@pytest.fixture(scope="module")
def long_prompt(pipe):
    """A prompt whose greedy answer runs LONG tokens without eos on the random model (checked, not assumed)."""
    image = Image.new("RGB", (40, 30), (30, 60, 90))
    for prompt in ("caption en", "ocr", "describe en", "answer en what is on the table", "detect cat"):
        pipe.generate([image], [prompt], SamplingOptions(max_new_tokens=LONG))
        if pipe.last.new_tokens == LONG:
            return prompt, image
    pytest.fail("no prompt gives a long answer on this random model")


class RecordingEngine(BatchEngine):
    """Records every request's last event; `delay_s` slows each decode step so that requests overlap."""

    def __init__(self, *args, delay_s: float = 0.0, parked: bool = False, **kw):
        super().__init__(*args, **kw)
        self.finals, self.delay_s = [], delay_s
        self.parked = threading.Event()
        if not parked:
            self.parked.set()

    def start(self):
        def run():
            self.parked.wait()
            super(RecordingEngine, self).start()
        threading.Thread(target=run, daemon=True).start()
        return self

    def _emit(self, job, event):
        if not hasattr(event, "text") or isinstance(event, Finished):
            self.finals.append(event)
        super()._emit(job, event)

    def _step(self):
        time.sleep(self.delay_s)
        super()._step()


def chat_body(text="caption en", image=None, **kw):
    image = image or Image.new("RGB", (40, 30), (1, 2, 3))
    return {"model": "tiny", "messages": user_message(text, data_url(image)), **kw}


def post(server, body, headers=AUTH, **kw):
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + "/v1/chat/completions", content=content,
                      headers={"Content-Type": "application/json", **headers}, timeout=30, **kw)


def assert_error(response, status, needle="", code=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and needle in error["message"], error
    if code is not None:
        assert error["code"] == code


@pytest.fixture(scope="module")
def server(pipe):
    engine = RecordingEngine(pipe, max_batch=2, max_queue=8, max_new_tokens=LONG)
    cfg = ServerConfig(model_name="tiny", api_key=KEY, max_body_bytes=64 * 1024, max_image_pixels=100 * 100,
                       max_images=2, max_tokens=LONG)
    with ServerThread(create_app(cfg, engine)) as s:
        s.engine = engine
        yield s


def test_every_bad_request_gets_its_status_and_the_server_still_answers(server, tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "local.png")
    big_png = Image.effect_noise((200, 120), 60).convert("RGB")  # noise: does not compress below the body limit
    cases = [
        (post(server, chat_body(), headers={}), 401, "API key", "invalid_api_key"),
        (post(server, chat_body(), headers={"Authorization": "Bearer wrong"}), 401, "API key", "invalid_api_key"),
        (post(server, b"x" * (65 * 1024)), 413, "bytes", "request_too_large"),
        (post(server, chat_body(image=big_png)), 413, "", None),  # body or image: either limit says 413
        (post(server, chat_body(image=Image.new("RGB", (101, 100)))), 413, "101x100", "image_too_large"),
        (post(server, b'{"model": "tiny", "messages": ['), 400, "not valid JSON", None),
        (post(server, b"[" * 30000 + b"]" * 30000), 400, "not valid JSON", None),  # nesting past the recursion limit
        (post(server, b"\xff\xfe not utf-8"), 400, "not valid JSON", None),
        (post(server, {"model": "tiny", "messages": user_message("hi", "data:text/plain;base64,aGk=")}), 400,
         "not an image", "not_an_image"),
        (post(server, {"model": "tiny", "messages": user_message("hi", str(tmp_path / "local.png"))}), 400,
         "--allow-files", "local_files_disabled"),
        (post(server, {"model": "tiny", "messages": user_message("hi", f"file://{tmp_path}/local.png")}), 400,
         "--allow-files", "local_files_disabled"),
        (post(server, {"model": "tiny", "messages": user_message("hi", "http://169.254.169.254/latest")}), 400,
         "--allow-remote-images", "remote_urls_disabled"),
        (post(server, {"model": "tiny", "messages": [{"role": "user", "content": "no image here"}]}), 400,
         "image_url", "image_required"),
        (post(server, {"model": "tiny", "messages": user_message("x", *[data_url(Image.new("RGB", (4, 4)))] * 3)}),
         400, "at most 2", "too_many_images"),
        (post(server, chat_body(max_tokens=LONG + 1)), 400, f"[1, {LONG}]", None),
        (post(server, chat_body(max_tokens="lots")), 400, "integer", None),
        (post(server, chat_body(temperature=-1)), 400, "temperature", None),
        (post(server, chat_body(n=2)), 400, "n=1", "unsupported_parameter"),
        (post(server, chat_body(stop=["a"] * 5)), 400, "stop", None),
        (post(server, chat_body(text="answer en " + "cat " * 2000)), 400, "characters", "prompt_too_long"),
        (post(server, {**chat_body(), "model": "gpt-4o"}), 404, "not served", "model_not_found"),
        (httpx.get(server.url + "/v1/nothing", headers=AUTH), 404, "no route", None),
        (httpx.get(server.url + "/v1/chat/completions", headers=AUTH), 405, "not allowed", None),
        (httpx.post(server.url + "/v1/embeddings", headers=AUTH, json={"input": "x"}), 404, "embeddings", None),
    ]
    for i, (response, status, needle, code) in enumerate(cases):
        try:
            assert_error(response, status, needle, code)
        except AssertionError as e:
            raise AssertionError(f"case {i}: {e}") from None
    ok = post(server, chat_body(max_tokens=3))
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert httpx.get(server.url + "/v1/models").status_code == 401


def test_a_client_that_leaves_mid_stream_frees_its_row_at_once(pipe, long_prompt):
    prompt, image = long_prompt
    engine = RecordingEngine(pipe, max_batch=1, max_new_tokens=LONG, delay_s=0.02)  # LONG steps take >= 4 s
    with ServerThread(create_app(ServerConfig(model_name="tiny", max_tokens=LONG), engine)) as s:
        body = chat_body(prompt, image, stream=True, max_tokens=LONG)
        with httpx.Client(timeout=30) as c, c.stream("POST", s.url + "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")  # the role chunk
            next(line for line in lines if '"content"' in line)  # a first token: the row is in use
        t0 = time.monotonic()
        short = httpx.post(s.url + "/v1/chat/completions", json=chat_body(max_tokens=2), timeout=30)
        waited = time.monotonic() - t0
    assert short.status_code == 200 and short.json()["usage"]["completion_tokens"] == 2
    assert waited < 2.0  # the one row was freed: the short request did not wait for the long answer
    left = engine.finals[0]
    assert left.reason == "cancelled" and left.completion_tokens < LONG


def test_a_full_queue_is_429_and_the_queued_request_is_served_once_the_engine_runs(pipe):
    engine = RecordingEngine(pipe, max_batch=1, max_queue=1, max_new_tokens=8, parked=True)
    with ServerThread(create_app(ServerConfig(model_name="tiny", max_tokens=8), engine)) as s:
        first = {}
        waiter = threading.Thread(target=lambda: first.update(r=post(s, chat_body(max_tokens=4), headers={})))
        waiter.start()
        deadline = time.monotonic() + 10
        while engine.stats()["waiting"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert_error(post(s, chat_body(max_tokens=4), headers={}), 429, "busy", "queue_full")
        engine.parked.set()
        waiter.join(30)
    assert first["r"].status_code == 200 and first["r"].json()["usage"]["completion_tokens"] == 4


def test_a_request_over_the_time_limit_is_504_and_a_stream_ends_with_an_error_event(pipe, long_prompt):
    prompt, image = long_prompt
    engine = RecordingEngine(pipe, max_batch=2, max_new_tokens=LONG, delay_s=0.02)
    cfg = ServerConfig(model_name="tiny", max_tokens=LONG, request_timeout_s=0.5)
    with ServerThread(create_app(cfg, engine)) as s:
        plain = post(s, chat_body(prompt, image, max_tokens=LONG), headers={})
        streamed = post(s, chat_body(prompt, image, max_tokens=LONG, stream=True), headers={})
    assert_error(plain, 504, "time limit", "request_timeout")
    events = [line.removeprefix("data: ") for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert json.loads(events[-1])["error"]["code"] == "request_timeout"
    assert sorted(e.reason for e in engine.finals) == ["timeout", "timeout"]
