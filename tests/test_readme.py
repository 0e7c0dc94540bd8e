"""Every `paligemma …` command the README shows is run here, in README order, so the README cannot drift.

Commands run in one scratch folder holding copies of `examples/` and `configs/`; what a command needs is
made by an earlier README command, except the hub (a fake one on 127.0.0.1, as in test_hub.py, with a
random VQ-VAE for `download --vae`) and the big_vision `.npz` (written from a tiny random model). Sizes are cut down where the README's real
numbers would take hours: `--n` at most 48 examples, `train` runs 2 steps, `eval` looks at 24 examples.
"""

from __future__ import annotations

import re
import shlex
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import constants
from typer.testing import CliRunner

from paligemma_cli.cli import app

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    """`paligemma …` lines of the README's sh blocks (also after `&&` in the set-up line)."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            for part in line.split("&&"):
                part = part.strip()
                if part.startswith("paligemma "):
                    commands.append(part)
    return commands


def cut_down(argv: list[str]) -> list[str]:
    argv = list(argv)
    if "--n" in argv:
        i = argv.index("--n") + 1
        argv[i] = str(min(int(argv[i]), 48))
    if argv[0] == "train":
        argv += ["--steps", "2", "--save-every", "1", "--batch-size", "8"]
        if "--objective" not in argv:
            argv += ["--eval-every", "1"]
    if argv[0] == "eval":
        argv += ["--limit", "24"]
    return argv


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    for name in ("PALIGEMMA_MODEL", "PALIGEMMA_CONFIG", "HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setattr(constants, "HF_HOME", str(home / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "hf" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "hf" / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    return tmp_path


def serve_fake_hub(argv: list[str], monkeypatch, scratch: Path):
    """A fake hub holding the model `download` names and, for `--vae`, a VQ-VAE where it is published."""
    from paligemma_cli.checkpoints.locate import VAE_FILE, VAE_REPO
    from tests.checkpoints.test_hub import FILES, FakeHub, Repo
    from tests.fixtures.vae_oracle import random_vae_params

    server = FakeHub()
    if not argv[1].startswith("-"):
        server.repos[argv[1]] = Repo(dict(FILES))
    if "--vae" in argv:
        np.savez(scratch / "random-vae.npz", **random_vae_params(0, 8))
        server.repos[VAE_REPO] = Repo({VAE_FILE: (scratch / "random-vae.npz").read_bytes()})
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    return server


def write_npz(path: Path) -> None:
    from paligemma_cli.checkpoints.big_vision import state_dict_to_npz
    from paligemma_cli.model.config import PaliGemmaConfig
    from paligemma_cli.model.paligemma import PaliGemma
    from tests.fixtures.hf_reference import tiny_hf_config

    model = PaliGemma(PaliGemmaConfig.from_dict(tiny_hf_config("gemma").to_dict()))
    with np.errstate(all="ignore"):
        np.savez(path, **state_dict_to_npz(model))


def test_readme_commands_run(scratch, monkeypatch):
    from tests.fixtures.tokenizer import make_tiny_tokenizer

    commands = readme_commands()
    assert len(commands) >= 10 and commands[0].startswith("paligemma ask examples/shapes.png")
    shown = {shlex.split(c)[1] for c in commands}
    assert shown >= {"ask", "caption", "detect", "chat", "eval", "train", "demo-data", "download", "convert",
                     "classify"}
    servers = []
    for command in commands:
        argv = cut_down(shlex.split(command)[1:])
        stdin = None
        if argv[0] == "download":
            servers.append(serve_fake_hub(argv, monkeypatch, scratch))
        if argv[0] == "convert" and argv[1].endswith(".npz"):
            write_npz(scratch / argv[1])
            if "--tokenizer" in argv:
                tok = scratch / argv[argv.index("--tokenizer") + 1]
                shutil.move(make_tiny_tokenizer(scratch / "tok"), tok)
        if argv[0] == "chat":
            stdin = "what color is the circle?\nhow many shapes are there?\n"
        result = CliRunner().invoke(app, argv, input=stdin)
        assert result.exit_code == 0, f"{command}\n{result.stdout}\n{result.stderr}"
        if command == commands[0]:
            # One short answer line from the built-in model (its accuracy is test_demo_model.py's job).
            assert len(result.stdout.splitlines()) == 1 and 0 < len(result.stdout.strip()) < 40
        if argv[0] == "chat":
            assert len(result.stdout.splitlines()) == 2
    for server in servers:
        server.shutdown()
        server.server_close()
