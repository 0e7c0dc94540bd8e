
"""`paligemma serve` as an operator runs it: one-line errors before anything loads, and a clean stop on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from functools import partial

import httpx
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from paligemma_cli.cli import friendly_errors
from paligemma_cli.commands.serve import serve
from tests.fixtures.checkpoints import make_tiny_checkpoint
from tests.fixtures.cli import one_line_error
from tests.fixtures.server import data_url, user_message

app = typer.Typer()
app.command("serve")(friendly_errors(serve))
app.command("unused")(lambda: None)  # two commands, so `serve` stays a subcommand as in the real CLI
runner = CliRunner()


one_line_error = partial(one_line_error, stdout=None)


def test_a_missing_extra_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # `import uvicorn` now raises ImportError
    one_line_error(runner.invoke(app, ["serve"]), 'pip install "paligemma-cli[serve]"')


def test_a_public_address_needs_an_api_key(monkeypatch):
    monkeypatch.delenv("PALIGEMMA_API_KEY", raising=False)
    one_line_error(runner.invoke(app, ["serve", "--host", "0.0.0.0"]), "--api-key")


def test_a_port_in_use_and_a_missing_files_folder_fail_before_loading(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        one_line_error(runner.invoke(app, ["serve", "--port", str(port)]), f"cannot listen on 127.0.0.1:{port}")
    one_line_error(runner.invoke(app, ["serve", "--allow-files", str(tmp_path / "nope")]), "no such folder")


def start_server(*args):
    """`paligemma serve --port 0 ...` in a child process; returns (process, base URL) once it listens."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "paligemma_cli", "serve", "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        lines.append(line)
        if "serving " in line:
            url = line.split(" on ", 1)[1].split("/v1", 1)[0]
            for _ in range(200):
                try:
                    httpx.get(url + "/health", timeout=1)
                    return proc, url, lines
                except httpx.TransportError:
                    time.sleep(0.05)
        if not line and proc.poll() is not None:
            break
    proc.kill()
    pytest.fail("the server did not start: " + "".join(lines))


# The random model's greedy answer to this prompt runs past 4000 tokens without eos (seconds of decoding).
@pytest.mark.parametrize("grace, max_tokens, finished", [("30", 300, True), ("0", 4000, False)])
def test_sigterm_stops_accepting_then_finishes_or_cancels_in_flight_requests_and_exits_0(tmp_path, grace, max_tokens,
                                                                                        finished):
    ckpt = make_tiny_checkpoint(tmp_path / "model")
    proc, url, lines = start_server("--model", str(ckpt), "--dtype", "fp32", "--device", "cpu", "--grace", grace,
                                    "--max-tokens", "4000", "--no-fast-layout")
    body = {"model": "model", "stream": True, "max_tokens": max_tokens,
            "messages": user_message("caption en", data_url(Image.new("RGB", (40, 30), (30, 60, 90))))}
    received = []
    first = threading.Event()

    def stream():
        try:
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line:
                        received.append(line)
                    if '"content"' in line:
                        first.set()
        except httpx.TransportError:  # the connection was cut: what arrived so far is in `received`
            pass

    client = threading.Thread(target=stream)
    client.start()
    try:
        assert first.wait(60), "no token arrived"
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(httpx.TransportError):  # no new connections once the stop began
            httpx.get(url + "/health", timeout=2)
        client.join(60)
        rc = proc.wait(60)
    finally:
        proc.kill()
    err = "".join(lines) + proc.stderr.read()
    assert rc == 0, err
    assert "stopped" in err.splitlines()[-1]
    data = [json.loads(line[6:]) for line in received if line.startswith("data: {")]
    reasons = [d["choices"][0]["finish_reason"] for d in data if d.get("choices")]
    if finished:  # within the grace period the answer runs to its end
        assert received[-1] == "data: [DONE]" and reasons[-1] == "length"
    else:  # no grace: the stream is cut, never completed
        assert "data: [DONE]" not in received and not any(reasons)
