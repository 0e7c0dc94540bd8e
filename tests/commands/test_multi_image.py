"""Several images in one prompt: `ask IMAGE --image MORE`, and the library call it makes."""

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from paligemma_cli.cli import app
from paligemma_cli.inference.generate import SamplingOptions
from paligemma_cli.inference.pipeline import Pipeline
from tests.fixtures.checkpoints import make_tiny_checkpoint, write_images


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_ask_about_two_images(ckpt, tmp_path):
    first, second = write_images(tmp_path, 2)
    result = run("ask", first, "--image", second, "same colour?", "--model", ckpt, "--max-tokens", 8, "--dtype", "fp32")
    assert result.exit_code == 0, result.output
    pipe = Pipeline.load(ckpt, "cpu", "fp32")
    opts = SamplingOptions(max_new_tokens=8)
    both = pipe.generate([[Image.open(first), Image.open(second)]], ["answer en same colour?"], opts)[0]
    assert result.stdout == both + "\n"
    assert pipe.last.prompt_tokens == 2 * pipe.processor.num_image_tokens + 1 + len(
        pipe.tokenizer.encode("answer en same colour?\n"))
    one = run("ask", first, "same colour?", "--model", ckpt, "--max-tokens", 8, "--dtype", "fp32")
    assert one.stdout == pipe.generate([Image.open(first)], ["answer en same colour?"], opts)[0] + "\n"
    record = json.loads(run("ask", first, "-i", second, "-i", first, "q?", "--model", ckpt, "--max-tokens", 3,
                            "--json").stdout)
    assert record["images"] == [str(first), str(second), str(first)]
    assert record["timings"]["prompt_tokens"] == 3 * pipe.processor.num_image_tokens + 1 + len(
        pipe.tokenizer.encode("answer en q?\n"))


def test_a_bad_second_image_is_one_line(ckpt, tmp_path):
    (first,) = write_images(tmp_path, 1)
    result = run("ask", first, "--image", tmp_path / "missing.png", "q?", "--model", ckpt)
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [f"error: cannot read image '{tmp_path / 'missing.png'}': no such file"]
