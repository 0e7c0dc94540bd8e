"""`paligemma chat` and `ChatSession`: piped and terminal sessions, and what the reused cache computes."""

import json
import os
import select
import subprocess
import sys
import time
from importlib.metadata import entry_points

import pytest
import torch
import typer
from typer.testing import CliRunner

from paligemma_cli.cli import friendly_errors
from paligemma_cli.commands.chat import chat
from paligemma_cli.inference.chat_session import ChatSession
from paligemma_cli.inference.generate import SamplingOptions
from paligemma_cli.inference.pipeline import Pipeline
from tests.fixtures.checkpoints import make_tiny_checkpoint, write_images

# Until pyproject.toml registers `chat`, mount it on an app of its own, as cli.register_plugins would.
app = typer.Typer()
app.callback()(lambda: None)  # a group, so the command is invoked as `chat ...` like the real CLI
app.command("chat")(friendly_errors(chat))
runner = CliRunner()

QUESTIONS = ["what is it?", "what color is the square?", "how many circles?"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("img"), 2)


@pytest.fixture(scope="module")
def pipe(ckpt):
    return Pipeline.load(ckpt, "cpu", "fp32")


def run_chat(ckpt, *args, input=""):
    return runner.invoke(app, ["chat", *map(str, args), "--model", str(ckpt), "--dtype", "fp32", "--device", "cpu"],
                         input=input)


def answers(session, prompts):
    return ["".join(session.ask(p)) for p in prompts]


# --- piped sessions -------------------------------------------------------------------------------


def test_piped_questions_give_one_line_each_and_nothing_else(ckpt, images, pipe):
    result = run_chat(ckpt, images[0], "--max-tokens", 6, input="".join(q + "\n" for q in QUESTIONS))
    assert result.exit_code == 0, result.output
    session = ChatSession(pipe, SamplingOptions(max_new_tokens=6))
    session.set_image(images[0])
    expected = answers(session, [f"answer en {q}" for q in QUESTIONS])
    assert result.stdout.splitlines() == expected
    assert result.stderr == ""  # no banner, prompt or timings for scripts


def test_slash_commands(ckpt, images, pipe, tmp_path):
    script = "\n".join([
        "/set max-tokens 4",
        "/set temperature 1.5",
        "/set seed 7",
        "first?",
        "/set temperature 0",
        "/image " + str(tmp_path / "missing.png"),  # an error, and the session goes on
        "/image " + str(images[1]),
        "/prompt caption en",
        "/set colour blue",  # unknown setting
        "/set top-p 2",  # out of range
        "/frobnicate",
        "/save " + str(tmp_path / "t.jsonl"),
        "/save " + str(tmp_path / "t.txt"),
        "/help",
        "/quit",
        "never asked",
    ]) + "\n"
    result = run_chat(ckpt, images[0], input=script)
    assert result.exit_code == 0, result.output

    session = ChatSession(pipe, SamplingOptions(max_new_tokens=4, temperature=1.5, seed=7))
    session.set_image(images[0])
    first = answers(session, ["answer en first?"])
    session.opts = SamplingOptions(max_new_tokens=4, seed=7)
    session.set_image(images[1])
    caption = answers(session, ["caption en"])
    assert result.stdout.splitlines() == first + caption

    errors = [l for l in result.stderr.splitlines() if l.startswith("error: ")]
    assert len(errors) == 4, result.stderr
    assert "missing.png" in errors[0] and "colour" in errors[1] and "top-p" in errors[2] and "frobnicate" in errors[3]
    assert "/image PATH" in result.stderr  # the help text

    records = [json.loads(l) for l in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["answer en first?", "caption en"]
    assert [r["answer"] for r in records] == first + caption
    assert records[1]["image"] == str(images[1]) and records[0]["timings"]["ttft_s"] > 0
    text = (tmp_path / "t.txt").read_text()
    assert "> caption en\n" + caption[0] + "\n" in text and f"# image: {images[1]}" in text


def test_questions_without_an_image_keep_lines_paired(ckpt, images):
    result = run_chat(ckpt, "--max-tokens", 3, input=f"no image yet?\n/image {images[0]}\nnow?\n")
    assert result.exit_code == 0, result.output
    lines = result.stdout.split("\n")
    assert len(lines) == 3 and lines[0] == "" and lines[2] == ""  # an empty answer line, then a real one
    assert "no image" in result.stderr


def test_too_long_question_is_an_error_line_and_the_session_goes_on(tmp_path, images):
    short = make_tiny_checkpoint(tmp_path / "short", max_positions=40)
    result = run_chat(short, images[0], "--max-tokens", 4, input="what " * 50 + "\n/set\nok?\n")
    assert result.exit_code == 0, result.output
    lines = result.stdout.split("\n")
    assert len(lines) == 3 and lines[0] == ""
    assert "allows at most" in result.stderr


def test_bad_image_argument_is_one_line(ckpt, tmp_path):
    result = run_chat(ckpt, tmp_path / "nope.png")
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.strip().startswith("error: ") and "nope.png" in result.stderr


# --- what the session computes -------------------------------------------------------------------


def test_exact_mode_equals_pipeline_stream(pipe, images):
    opts = SamplingOptions(max_new_tokens=8)
    session = ChatSession(pipe, opts, exact=True)
    session.set_image(images[0])
    prompts = [f"answer en {q}" for q in QUESTIONS] + ["caption en"]
    assert answers(session, prompts) == ["".join(pipe.stream(images[0], p, opts)) for p in prompts]


def reference_reuse_answer(model, tok, pixels, prompt, max_new):
    """Greedy tokens from a cache built by hand: prefill image+bos, then the question, then decode."""
    n = model.config.num_image_tokens
    cache = model.new_cache(1, n + 1 + 64 + max_new)
    head = torch.tensor([[tok.image_token_id] * n + [tok.bos_id]])
    question = torch.tensor([tok.encode(prompt + "\n")])
    out = []
    with torch.inference_mode():
        model.extend(cache, head, pixels, torch.zeros_like(head), torch.ones_like(head))
        logits = model.extend(cache, question, None, torch.zeros_like(question), torch.ones_like(question))
        for _ in range(max_new):
            token = int(logits.argmax(-1))
            if token == tok.eos_id:
                break
            out.append(token)
            logits = model.extend(cache, torch.tensor([[token]]))
    return tok.decode(out)


def test_reuse_mode_equals_a_hand_built_cache_and_a_fresh_session(pipe, images):
    opts = SamplingOptions(max_new_tokens=8)
    session = ChatSession(pipe, opts)
    session.set_image(images[0])
    prompts = [f"answer en {q}" for q in QUESTIONS]
    got = answers(session, prompts)
    pixels = pipe.processor.pixel_values(images[0])
    assert got == [reference_reuse_answer(pipe.model, pipe.tokenizer, pixels, p, 8) for p in prompts]
    for p, a in zip(prompts, got):  # nothing of an earlier question leaks into a later one
        fresh = ChatSession(pipe, opts)
        fresh.set_image(images[0])
        assert answers(fresh, [p]) == [a]


def test_second_question_does_not_rerun_the_vision_tower(pipe, images, monkeypatch):
    calls = []
    tower = pipe.model.vision_tower
    original = tower.forward
    monkeypatch.setattr(tower, "forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    session = ChatSession(pipe, SamplingOptions(max_new_tokens=4))
    session.set_image(images[0])
    answers(session, ["answer en one?"])
    assert len(calls) == 1
    answers(session, ["answer en two?", "caption en"])
    assert len(calls) == 1
    session.set_image(images[1])  # a new image is encoded once more
    answers(session, ["answer en three?", "answer en four?"])
    assert len(calls) == 2
    exact = ChatSession(pipe, SamplingOptions(max_new_tokens=4), exact=True)
    exact.set_image(images[0])
    answers(exact, ["answer en one?", "answer en two?"])
    assert len(calls) == 4  # exact mode re-encodes every time, by design


def test_cache_grows_for_a_long_question_without_reencoding(pipe, images):
    session = ChatSession(pipe, SamplingOptions(max_new_tokens=5))
    session.set_image(images[0])
    short = answers(session, ["answer en hi?"])
    size = session._cache.max_len
    long_prompt = "answer en " + "very " * 120 + "long?"
    long_answer = answers(session, [long_prompt])
    assert session._cache.max_len > size
    fresh = ChatSession(pipe, SamplingOptions(max_new_tokens=5))
    fresh.set_image(images[0])
    assert answers(fresh, [long_prompt]) == long_answer
    assert answers(session, ["answer en hi?"]) == short
    session.opts = SamplingOptions(max_new_tokens=300)  # more new tokens than the cache has room for
    assert answers(session, ["answer en hi?"])[0].startswith(short[0])


def test_timings_history_and_reset(pipe, images):
    session = ChatSession(pipe, SamplingOptions(max_new_tokens=4))
    with pytest.raises(Exception, match="no image"):
        answers(session, ["answer en x?"])
    session.set_image(images[0])
    answers(session, ["answer en a?", "answer en b?"])
    assert len(session.history) == 2 and session.last.ttft_s > 0
    assert session.history[0].stats.prompt_tokens == pipe.model.config.num_image_tokens + 1 + len(
        pipe.tokenizer.encode("answer en a?\n"))
    session.reset()
    assert session.history == [] and session.has_image


# --- a real terminal ------------------------------------------------------------------------------


def chat_command(ckpt, image):
    """`python -m paligemma_cli chat ...` once the entry point is installed; the same command mounted by hand before."""
    args = ["chat", str(image), "--model", str(ckpt), "--max-tokens", "5", "--dtype", "fp32", "--device", "cpu"]
    if "chat" in {e.name for e in entry_points(group="paligemma.commands")}:
        return [sys.executable, "-m", "paligemma_cli", *args]
    mount = ("import sys, typer; from paligemma_cli.cli import friendly_errors; "
             "from paligemma_cli.commands.chat import chat; app = typer.Typer(); app.callback()(lambda: None); "
             "app.command('chat')(friendly_errors(chat)); app()")
    return [sys.executable, "-c", mount, *args]


def read_until(fd, needle: bytes, buf: bytearray, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while needle not in buf:
        left = deadline - time.monotonic()
        assert left > 0, f"timed out waiting for {needle!r}; got {bytes(buf)!r}"
        if select.select([fd], [], [], left)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                chunk = b""
            assert chunk, f"terminal closed before {needle!r}; got {bytes(buf)!r}"
            buf += chunk


def test_terminal_session_with_line_editing_and_history(ckpt, images, pipe, tmp_path):
    session = ChatSession(pipe, SamplingOptions(max_new_tokens=5))
    session.set_image(images[0])
    expected = answers(session, ["answer en what is it?", "answer en and the color?"])
    again = expected[1]

    master, slave = os.openpty()
    env = {**os.environ, "HOME": str(tmp_path), "TERM": "dumb", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(chat_command(ckpt, images[0]), stdin=slave, stdout=slave, stderr=subprocess.PIPE,
                            env=env, close_fds=True)
    os.close(slave)
    out = bytearray()
    try:
        for question in ("what is it?", "and the color?"):
            read_until(master, b"> ", out)
            del out[:]
            os.write(master, question.encode() + b"\n")
            read_until(master, b"\n> ", out)  # the answer is complete when the next prompt shows
            text = out.decode(errors="replace").replace("\r", "")
            assert f"{expected.pop(0)}\n> " in text, text
            out[:] = b"> "
        read_until(master, b"> ", out)
        del out[:]
        os.write(master, b"\x10\n")  # Ctrl-P: readline recalls the previous line
        read_until(master, b"\n> ", out)
        assert f"and the color?\n{again}\n> " in out.decode(errors="replace").replace("\r", ""), bytes(out)
        os.write(master, b"/quit\n")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    stderr = proc.stderr.read().decode()
    assert "/help" in stderr and "tok/s" in stderr  # banner and timings go to stderr
    history = (tmp_path / ".cache" / "paligemma" / "chat_history").read_text()
    assert "what is it?" in history and "/quit" in history
