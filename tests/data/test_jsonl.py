"""Reading JSONL datasets, and the `demo-data` command that writes one."""

import json

import pytest
import typer
from typer.testing import CliRunner

from paligemma_cli.cli import friendly_errors
from paligemma_cli.commands.demo_data import demo_data
from paligemma_cli.data.jsonl import Example, read_jsonl
from paligemma_cli.data.shapes import write_dataset
from paligemma_cli.errors import PaliGemmaError


def test_reads_what_write_dataset_wrote(tmp_path):
    path = write_dataset(tmp_path / "set", 12, seed=0)
    examples = read_jsonl(path)
    assert len(examples) == 12
    assert examples[0].image == tmp_path / "set" / "images" / "000000.png"
    assert all(e.image.is_file() for e in examples)
    assert {e.task for e in examples} == {"caption", "color", "count", "spatial", "detect"}
    assert all(isinstance(e.suffix, str) and e.prefix for e in examples)


def test_suffix_lists_optional_task_absolute_paths_and_blank_lines(tmp_path):
    path = tmp_path / "eval.jsonl"
    lines = [
        {"image": "a.png", "prefix": "caption en", "suffix": ["a red circle", "one red circle"]},
        {"image": "/abs/b.png", "prefix": "ocr", "suffix": "hi", "task": "ocr", "extra": 1},
        {"image": "c.png", "prefix": "caption en", "suffix": "a red circle and a blue square",
         "negatives": ["a blue square and a red circle"]},
    ]
    path.write_text(json.dumps(lines[0]) + "\n\n" + json.dumps(lines[1]) + "\n" + json.dumps(lines[2]) + "\n")
    a, b, c = read_jsonl(path)
    assert a == Example(tmp_path / "a.png", "caption en", ["a red circle", "one red circle"], None)
    assert a.negatives == () and c.negatives == ("a blue square and a red circle",)
    assert a.references == ["a red circle", "one red circle"]
    assert b.image.as_posix() == "/abs/b.png" and b.task == "ocr" and b.references == ["hi"]


GOOD = '{"image": "a.png", "prefix": "caption en", "suffix": "x"}'


@pytest.mark.parametrize(
    "bad, message",
    [
        ('{"image": "a.png", "prefix": "caption en", "suffix": "x"', "not valid JSON"),
        ('["a.png", "caption en", "x"]', "expected a JSON object"),
        ('{"image": "a.png", "suffix": "x"}', "missing key 'prefix'"),
        ('{"prefix": "p"}', "missing keys 'image', 'suffix'"),
        ('{"image": 3, "prefix": "p", "suffix": "x"}', "'image' must be a string"),
        ('{"image": "", "prefix": "p", "suffix": "x"}', "'image' is empty"),
        ('{"image": "a.png", "prefix": null, "suffix": "x"}', "'prefix' must be a string"),
        ('{"image": "a.png", "prefix": "p", "suffix": []}', "'suffix' must be a string or a non-empty list"),
        ('{"image": "a.png", "prefix": "p", "suffix": ["x", 2]}', "'suffix' must be a string or a non-empty list"),
        ('{"image": "a.png", "prefix": "p", "suffix": "x", "task": 5}', "'task' must be a string"),
        ('{"image": "a.png", "prefix": "p", "suffix": "x", "negatives": "y"}', "'negatives' must be a list"),
        ('{"image": "a.png", "prefix": "p", "suffix": "x", "negatives": ["y", 1]}', "'negatives' must be a list"),
    ],
)
def test_bad_line_names_file_and_line_number(tmp_path, bad, message):
    path = tmp_path / "data.jsonl"
    path.write_text(f"{GOOD}\n\n{GOOD}\n{bad}\n{GOOD}\n")  # the blank line still counts: bad is line 4
    with pytest.raises(PaliGemmaError) as e:
        read_jsonl(path)
    assert str(e.value).startswith(f"{path}:4: ")
    assert message in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(PaliGemmaError, match="no such file"):
        read_jsonl(tmp_path / "nope.jsonl")


# ---------------------------------------------------------------------------------------------
# The command, wired the way cli.py wires plugins


@pytest.fixture
def invoke():
    app = typer.Typer()
    app.command("demo-data")(friendly_errors(demo_data))

    @app.command("other")  # a second command, so Typer keeps "demo-data" as a subcommand name
    def _other() -> None: ...

    return lambda *args: CliRunner().invoke(app, ["demo-data", *map(str, args)])


def test_command_writes_and_prints_only_the_jsonl_path(invoke, tmp_path):
    out = tmp_path / "shapes"
    result = invoke(out, "--n", 15, "--seed", 4, "--image-size", 48)
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{out / 'data.jsonl'}\n"
    examples = read_jsonl(out / "data.jsonl")
    assert len(examples) == 15
    assert (out / "data.jsonl").read_bytes() == write_dataset(tmp_path / "again", 15, 4, 48).read_bytes()


def test_command_refuses_a_non_empty_folder_without_force(invoke, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    result = invoke(tmp_path, "--n", 3)
    assert result.exit_code == 1
    assert "not empty" in result.stderr and "--force" in result.stderr and result.stdout == ""
    assert not (tmp_path / "data.jsonl").exists()

    result = invoke(tmp_path, "--n", 3, "--force")
    assert result.exit_code == 0, result.output
    assert len(read_jsonl(tmp_path / "data.jsonl")) == 3
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_force_never_replaces_a_dataset_this_tool_did_not_write(invoke, tmp_path):
    (tmp_path / "data.jsonl").write_text('{"image": "mine.png", "prefix": "caption en", "suffix": "mine"}\n')
    result = invoke(tmp_path, "--n", 3, "--force")
    assert result.exit_code == 1 and "did not write" in result.stderr
    assert "mine" in (tmp_path / "data.jsonl").read_text()
    assert invoke(tmp_path / "ours", "--n", 2).exit_code == 0
    assert invoke(tmp_path / "ours", "--n", 3, "--force").exit_code == 0  # its own: rewritten
    assert len(read_jsonl(tmp_path / "ours" / "data.jsonl")) == 3


def test_command_task_keeps_only_those_tasks(invoke, tmp_path):
    """`--task caption` writes the caption lines of scenes 0..n-1 (the pairs contrastive training uses);
    two tasks keep their 20 % : 10 % proportion from the full mix."""
    from paligemma_cli.data.shapes import caption, make_scene

    result = invoke(tmp_path / "caps", "--n", 12, "--seed", 3, "--task", "caption")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (tmp_path / "caps" / "data.jsonl").read_text().splitlines()]
    assert [ln["suffix"] for ln in lines] == [caption(make_scene(3, i)) for i in range(12)]
    assert {ln["prefix"] for ln in lines} == {"caption en"}

    result = invoke(tmp_path / "two", "--n", 30, "--task", "caption", "--task", "count")
    assert result.exit_code == 0, result.output
    tasks = [ex["task"] for ex in map(json.loads, (tmp_path / "two" / "data.jsonl").read_text().splitlines())]
    assert tasks.count("caption") == 20 and tasks.count("count") == 10


@pytest.mark.parametrize("args, message", [(["--n", 0], "--n must be at least 1"), (["--image-size", 16], "--image-size"),
                                           (["--task", "colour"], "unknown task(s) colour; choose from")])
def test_command_rejects_bad_options(invoke, tmp_path, args, message):
    result = invoke(tmp_path / "x", *args)
    assert result.exit_code == 1 and message in result.stderr
    assert not (tmp_path / "x").exists()


def test_command_help_has_examples():
    app = typer.Typer()
    app.command("demo-data")(demo_data)
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "paligemma demo-data data/shapes-train --n 20000 --seed 0" in result.stdout
    for option in ("--n", "--seed", "--image-size", "--force"):
        assert option in result.stdout
