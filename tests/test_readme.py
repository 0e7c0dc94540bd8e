"""The README and the pages in docs/ show commands and code that are run or checked here, so they cannot drift.

- Every `paligemma …` line of a ```sh block is run, in page order, in one scratch folder per page holding
  copies of `examples/` and `configs/`; what a command needs is made by an earlier command of the same page,
  except the hub (a fake one on 127.0.0.1, as in test_hub.py, with a random VQ-VAE for `download --vae`) and
  the big_vision `.npz` (written from a tiny random model). Sizes are cut down where the pages' real numbers would take hours: `--n` at most 48
  examples, `train` runs 2 steps, `eval` looks at 24 examples.
- Every command line the pages show, in sh blocks or inline (`paligemma …`, `python bench/…`), is parsed by
  the real argument parser without being run: the subcommand or script exists and takes every flag and
  value given. That is all the benchmark lines get (3B benchmarks and hour-long runs), and the `torchrun`
  (and `srun … torchrun`) lines: torchrun's parser reads its flags, the CLI the command it launches.
- The README's Python example is executed on the built-in demo model.
- Links, repository paths in backticks, and the code's pointers to docs/ pages resolve.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import constants
from typer.testing import CliRunner

from paligemma_cli.cli import app

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
REPO_DIRS = ("paligemma_cli", "bench", "configs", "docs", "examples", "tests")


def name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def sh_lines(page: Path) -> list[str]:
    """Command lines of a page's sh blocks (continuation lines joined; split at `&&`)."""
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", page.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            lines += [part.strip() for part in line.split("&&") if part.strip()]
    return lines


def console_lines(page: Path) -> list[str]:
    """`$ …` lines of a page's console blocks (commands that do not finish, like a server: parsed, not run)."""
    lines = []
    for block in re.findall(r"```console\n(.*?)```", page.read_text(), flags=re.S):
        lines += [shlex.join(shlex.split(line[2:], comments=True)) for line in block.splitlines()
                  if line.startswith("$ ")]
    return lines


def readme_commands(page: Path = README) -> list[str]:
    """`paligemma …` lines of a page's sh blocks (also after `&&` in the set-up line)."""
    return [line for line in sh_lines(page) if line.startswith("paligemma ")]


def inline_commands(page: Path, prefixes: tuple[str, ...] = ("paligemma ", "python bench/")) -> list[str]:
    """`paligemma …` and `python bench/…` (or other `prefixes`) in inline code outside the fenced blocks."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    spans = (" ".join(span.split()) for span in re.findall(r"`([^`]+)`", text))
    return [span for span in spans if span.startswith(prefixes)]


def shell_words(command: str) -> list[str]:
    """The command's words up to a redirection or pipe; `[--optional flag]` brackets dropped."""
    words = []
    for word in shlex.split(command):
        if word in (">", ">>", "|", "2>", "<"):
            break
        words.append(word.strip("[]"))
    return [w for w in words if w]


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
    for var in ("PALIGEMMA_MODEL", "PALIGEMMA_CONFIG", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
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


def write_npz(path: Path, vocabulary: int) -> None:
    """A tiny random big_vision checkpoint whose vocabulary (and so <image> id) is `vocabulary`."""
    from paligemma_cli.checkpoints.big_vision import state_dict_to_npz
    from paligemma_cli.model.config import PaliGemmaConfig
    from paligemma_cli.model.paligemma import PaliGemma
    from tests.fixtures.hf_reference import tiny_hf_config

    model = PaliGemma(PaliGemmaConfig.from_dict(tiny_hf_config("gemma").to_dict()))
    with np.errstate(all="ignore"):
        arrays = state_dict_to_npz(model)
    key = "params/llm/embedder/input_embedding"
    arrays[key] = np.zeros((vocabulary, arrays[key].shape[1]), arrays[key].dtype)
    np.savez(path, **arrays)


CHAT_INPUT = "what color is the circle?\nhow many shapes are there?\n"


def run_commands(commands: list[str], scratch: Path, monkeypatch) -> dict[str, object]:
    """Run the commands in order in `scratch` (cut down); each must exit 0. Returns the results by command."""
    from paligemma_cli.processing.tokenizer import PaliGemmaTokenizer
    from tests.fixtures.tokenizer import make_tiny_tokenizer

    results, servers = {}, []
    try:
        for command in commands:
            argv = cut_down(shlex.split(command)[1:])
            stdin = None
            if argv[0] == "download":
                servers.append(serve_fake_hub(argv, monkeypatch, scratch))
            if argv[0] == "convert" and argv[1].endswith(".npz") and not (scratch / argv[1]).exists():
                # a big_vision checkpoint, unless an earlier command made the file (a VQ-VAE that `train` wrote)
                tok_file = make_tiny_tokenizer(scratch / "tok")
                write_npz(scratch / argv[1], PaliGemmaTokenizer.from_file(tok_file).image_token_id)
                if "--tokenizer" in argv:
                    shutil.move(tok_file, scratch / argv[argv.index("--tokenizer") + 1])
            if argv[0] == "chat":
                stdin = CHAT_INPUT
            result = CliRunner().invoke(app, argv, input=stdin)
            assert result.exit_code == 0, f"{command}\n{result.stdout}\n{result.stderr}"
            if argv[0] == "chat":
                assert len(result.stdout.splitlines()) == 2, f"{command}\n{result.stdout}"
            results[command] = result
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
    return results


def test_readme_commands_run(scratch, monkeypatch):
    commands = readme_commands()
    assert len(commands) >= 10 and commands[0].startswith("paligemma ask examples/shapes.png")
    shown = {shlex.split(c)[1] for c in commands}
    assert shown >= {"ask", "caption", "detect", "chat", "eval", "train", "demo-data", "download", "convert",
                     "classify"}
    results = run_commands(commands, scratch, monkeypatch)
    # One short answer line from the built-in model (its accuracy is test_demo_model.py's job).
    first = results[commands[0]].stdout
    assert len(first.splitlines()) == 1 and 0 < len(first.strip()) < 40


@pytest.mark.parametrize("page", DOCS, ids=name)
def test_docs_commands_run(page, scratch, monkeypatch):
    commands = readme_commands(page)
    if not commands:
        pytest.skip(f"{name(page)} shows no paligemma command")
    run_commands(commands, scratch, monkeypatch)


def test_docs_pages_show_their_commands():
    """The narratives that moved out of the README keep their commands (so the test above has work)."""
    shown = {name(page): {shlex.split(c)[1] for c in readme_commands(page)} for page in DOCS}
    assert shown["docs/demo-model.md"] >= {"demo-data", "train", "eval"}
    assert shown["docs/contrastive.md"] >= {"demo-data", "train", "eval", "classify"}
    assert shown["docs/speed.md"] >= {"chat", "eval"}
    bench = {page: [c for c in sh_lines(page) if c.startswith("python bench/")] for page in PAGES}
    assert len(bench[ROOT / "docs" / "speed.md"]) >= 5


# --- every command line, parsed without running --------------------------------------------------------

def all_command_lines() -> list[tuple[str, str]]:
    """(page, command) for every command line shown anywhere, in sh blocks or inline."""
    found = []
    for page in PAGES:
        for command in sh_lines(page) + console_lines(page) + inline_commands(page):
            if command.startswith(("paligemma ", "python bench/")):
                found.append((name(page), command))
    return found


def test_cli_command_lines_parse():
    import typer

    group = typer.main.get_command(app)
    lines = [(page, c) for page, c in all_command_lines() if c.startswith("paligemma ")]
    assert len(lines) >= 40
    problems = []
    for page, command in lines:
        words = shell_words(command)
        sub, args = words[1], words[2:]
        if sub not in group.commands:
            problems.append(f"{page}: `{command}`: no subcommand {sub!r}")
        elif args:  # `paligemma eval` alone in prose names the command; with arguments it must parse
            try:
                group.commands[sub].make_context(sub, args)
            except Exception as e:  # click's UsageError family (typer vendors click)
                problems.append(f"{page}: `{command}`: {getattr(e, 'format_message', e.__str__)()}")
    assert not problems, "\n".join(problems)


def test_torchrun_command_lines_parse():
    """`torchrun …` lines (and `srun … torchrun …`) are parsed twice without running: torchrun's own flags by
    torchrun's parser, then the paligemma command it launches (`-m paligemma_cli` or `--no-python paligemma`)
    by the CLI."""
    import typer
    from torch.distributed.run import get_args_parser

    group = typer.main.get_command(app)
    lines = [(name(page), c) for page in PAGES for c in sh_lines(page) + inline_commands(page, ("torchrun ", "srun "))
             if c.startswith(("torchrun ", "srun "))]
    assert len(lines) >= 6
    problems = []
    for page, command in lines:
        words = shell_words(command)
        if words[0] == "srun":  # srun's own flags are SLURM's; what it starts is checked
            words = words[words.index("torchrun"):] if "torchrun" in words else []
        try:
            launch = get_args_parser().parse_args(words[1:])
        except SystemExit:
            problems.append(f"{page}: `{command}`: rejected by torchrun's parser (see stderr)")
            continue
        if not ((launch.module and launch.training_script == "paligemma_cli")
                or (launch.no_python and launch.training_script == "paligemma")):
            problems.append(f"{page}: `{command}`: launches {launch.training_script!r}, not paligemma")
            continue
        sub, args = launch.training_script_args[0], launch.training_script_args[1:]
        try:
            group.commands[sub].make_context(sub, args)
        except Exception as e:
            problems.append(f"{page}: `{command}`: {getattr(e, 'format_message', e.__str__)()}")
    assert not problems, "\n".join(problems)


# Runs each script as __main__ with argparse stopped right after a successful parse_args: the script's own
# parser checks the line (unknown flags, bad values, missing arguments) and nothing is benchmarked.
CHECK_BENCH = r"""
import argparse, json, runpy, sys

class Parsed(Exception):
    pass

parse_args = argparse.ArgumentParser.parse_args

def parse_then_stop(self, args=None, namespace=None):
    parse_args(self, args, namespace)
    raise Parsed

argparse.ArgumentParser.parse_args = parse_then_stop
verdicts = []
for script, args in json.loads(sys.stdin.read()):
    sys.argv = [script, *args]
    sys.path.insert(0, str(__import__("pathlib").Path(script).resolve().parent))  # as `python script` does
    try:
        runpy.run_path(script, run_name="__main__")
        verdicts.append("the script did not parse arguments")
    except Parsed:
        verdicts.append("")
    except SystemExit as e:
        verdicts.append(f"rejected by its parser (exit {e.code}); see stderr")
print("VERDICTS " + json.dumps(verdicts))
"""


def test_bench_command_lines_parse():
    lines = [(page, c) for page, c in all_command_lines() if c.startswith("python bench/")]
    assert len(lines) >= 10
    problems, todo = [], []
    for page, command in lines:
        words = shell_words(command)
        script = words[1]
        if not (ROOT / script).is_file():
            problems.append(f"{page}: `{command}`: no script {script}")
        else:
            todo.append((page, command, script, words[2:]))
    proc = subprocess.run([sys.executable, "-c", CHECK_BENCH], cwd=ROOT, capture_output=True, text=True,
                          input=json.dumps([[script, args] for _, _, script, args in todo]), timeout=300)
    verdict_line = [line for line in proc.stdout.splitlines() if line.startswith("VERDICTS ")]
    assert proc.returncode == 0 and verdict_line, proc.stderr[-3000:]
    for (page, command, _, _), verdict in zip(todo, json.loads(verdict_line[0].removeprefix("VERDICTS "))):
        if verdict:
            problems.append(f"{page}: `{command}`: {verdict}")
    assert not problems, "\n".join(problems) + "\n" + proc.stderr[-3000:]


# --- the library example --------------------------------------------------------------------------------

def test_readme_library_example(monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 1
    code = blocks[0]
    assert "from paligemma_cli import" in code and "Pipeline.load(" in code
    monkeypatch.chdir(ROOT)  # the example names the built-in model's folder and examples/ from the repo root
    for var in ("PALIGEMMA_MODEL", "PALIGEMMA_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    namespace = {"__name__": "readme_example"}
    exec(compile(code, "README.md (python)", "exec"), namespace)
    out = capsys.readouterr().out.splitlines()
    answers = ast.literal_eval(out[0])  # generate: one answer per (image, prompt)
    assert len(answers) == 2 and all(isinstance(a, str) and a for a in answers)
    assert out[1].strip() and "tokens/s" in out[2]  # the streamed answer, then the timings
    model, logits = namespace["model"], namespace["logits"]
    assert logits.shape[0] == 1 and logits.shape[-1] == model.config.text.vocab_size


# --- links and paths --------------------------------------------------------------------------------------

def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_and_paths_resolve():
    problems = []
    for page in PAGES:
        text = page.read_text()
        prose = re.sub(r"```.*?```", "", text, flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", prose):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                problems.append(f"{name(page)}: link to missing {target}")
            elif anchor and anchor not in {slug(h) for h in re.findall(r"^#+ (.+)$", file.read_text(), re.M)}:
                problems.append(f"{name(page)}: link to missing heading {target}")
        for span in re.findall(r"`([^`\s]+)`", prose):
            if span.startswith(tuple(d + "/" for d in REPO_DIRS)) and not list(ROOT.glob(span.rstrip("/"))):
                problems.append(f"{name(page)}: no such path `{span}`")
    # The code's comments point to docs pages for their figures; each page names the file pointing to it.
    for source in sorted((ROOT / "paligemma_cli").rglob("*.py")):
        for doc in set(re.findall(r"docs/[\w-]+\.md", source.read_text())):
            if not (ROOT / doc).is_file():
                problems.append(f"{source.relative_to(ROOT)} points to missing {doc}")
            elif source.relative_to(ROOT).as_posix() not in (ROOT / doc).read_text():
                problems.append(f"{doc} does not name {source.relative_to(ROOT)}, which points to it")
    assert not problems, "\n".join(problems)
