"""ask, caption and detect, driven as a user drives them: exit codes, stdout and stderr apart."""

import csv
import io
import json
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from paligemma_cli.cli import app
from paligemma_cli.inference.generate import SamplingOptions
from paligemma_cli.inference.pipeline import Pipeline
from tests.fixtures.checkpoints import make_tiny_checkpoint, write_images
from tests.fixtures.cli import one_line_error

runner = CliRunner()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("img"), 1)[0]


def run(*args, **kw):
    return runner.invoke(app, [str(a) for a in args], **kw)


one_line_error = partial(one_line_error, exit_code=None)


def test_ask_streams_the_same_answer_as_batch_generation(ckpt, image):
    result = run("ask", image, "what is it?", "--model", ckpt, "--max-tokens", 8, "--dtype", "fp32")
    assert result.exit_code == 0, result.output
    pipe = Pipeline.load(ckpt, "cpu", "fp32")
    expected = pipe.generate([Image.open(image)], ["answer en what is it?"], SamplingOptions(max_new_tokens=8))[0]
    assert result.stdout == expected + "\n"
    assert "tok/s" in result.stderr and "tok/s" not in result.stdout


def test_ask_json_has_answer_model_prompt_timings(ckpt, image):
    result = run("ask", image, "--prompt", "caption en", "--model", ckpt, "--max-tokens", 5, "--json", "--dtype", "fp32")
    assert result.exit_code == 0, result.output
    obj = json.loads(result.stdout)
    assert obj["prompt"] == "caption en" and obj["model"] == str(ckpt)
    assert isinstance(obj["answer"], str)
    assert obj["timings"]["new_tokens"] <= 5 and obj["timings"]["ttft_s"] > 0


def test_ask_seed_makes_sampling_repeatable(ckpt, image):
    args = ("ask", image, "what?", "--model", ckpt, "--max-tokens", 12, "--temperature", 1.5, "--dtype", "fp32")
    a, b = run(*args, "--seed", 3), run(*args, "--seed", 3)
    others = {run(*args, "--seed", s).stdout for s in (4, 5, 6)}
    assert a.stdout == b.stdout
    assert len(others | {a.stdout}) > 1


def test_ask_reads_the_image_from_stdin(ckpt, image):
    piped = run("ask", "-", "what?", "--model", ckpt, "--max-tokens", 6, "--dtype", "fp32", input=image.read_bytes())
    direct = run("ask", image, "what?", "--model", ckpt, "--max-tokens", 6, "--dtype", "fp32")
    assert piped.exit_code == 0 and piped.stdout == direct.stdout


def test_default_model_from_environment(ckpt, image, monkeypatch):
    monkeypatch.setenv("PALIGEMMA_MODEL", str(ckpt))
    result = run("ask", image, "what?", "--max-tokens", 3, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["model"] == str(ckpt)


def test_bad_input_gives_one_line(ckpt, image, tmp_path):
    one_line_error(run("ask", tmp_path / "nope.jpg", "q?", "--model", ckpt), "nope.jpg")
    corrupt = tmp_path / "bad.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    one_line_error(run("ask", corrupt, "q?", "--model", ckpt), "bad.png")
    (tmp_path / "empty").mkdir()
    one_line_error(run("ask", image, "q?", "--model", tmp_path / "empty"), "config.json")
    one_line_error(run("ask", image, "--model", ckpt), "QUESTION")
    one_line_error(run("ask", image, "q?", "--model", ckpt, "--device", "tpu"), "--device")
    one_line_error(run("ask", image, "q?", "--model", ckpt, "--dtype", "int3"), "--dtype")


def test_prompt_too_long_for_the_model(tmp_path, image):
    short = make_tiny_checkpoint(tmp_path / "short", max_positions=40)
    one_line_error(run("ask", image, "what " * 50, "--model", short, "--max-tokens", 4), "allows at most")


def test_caption_folder_writes_a_record_per_image_and_skips_unreadable(ckpt, tmp_path):
    folder = tmp_path / "pics"
    write_images(folder, 3)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    write_images(folder / "sub", 2)
    out = tmp_path / "caps.jsonl"
    result = run("caption", folder, "--model", ckpt, "--out", out, "--batch-size", 2, "--max-tokens", 4,
                 "--dtype", "fp32")
    assert result.exit_code == 0, result.output
    records = [json.loads(l) for l in out.read_text().splitlines()]
    assert sorted(Path(r["image"]).name for r in records) == ["img0.png", "img1.png", "img2.png"]
    assert "broken.jpg" in result.stderr and "1 unreadable" in result.stderr
    rec = run("caption", folder, "--recursive", "--model", ckpt, "--max-tokens", 4, "--format", "txt")
    assert len(rec.stdout.splitlines()) == 5


def test_caption_batch_equals_one_by_one(ckpt, tmp_path):
    folder = tmp_path / "pics"
    write_images(folder, 3)
    batched = run("caption", folder, "--model", ckpt, "--batch-size", 3, "--max-tokens", 6, "--dtype", "fp32")
    single = run("caption", folder, "--model", ckpt, "--batch-size", 1, "--max-tokens", 6, "--dtype", "fp32")
    assert batched.exit_code == 0 and batched.stdout == single.stdout


def test_caption_resume_continues_without_repeating(ckpt, tmp_path):
    folder = tmp_path / "pics"
    write_images(folder, 4)
    out = tmp_path / "caps.csv"
    first = run("caption", folder / "img0.png", folder / "img1.png", "--model", ckpt, "--out", out,
                "--format", "csv", "--max-tokens", 3)
    assert first.exit_code == 0
    before = out.read_text()
    second = run("caption", folder, "--model", ckpt, "--out", out, "--format", "csv", "--resume", "--max-tokens", 3)
    assert second.exit_code == 0, second.output
    assert out.read_text().startswith(before)
    rows = list(csv.reader(io.StringIO(out.read_text())))
    assert rows[0] == ["image", "caption"]
    assert sorted(Path(r[0]).name for r in rows[1:]) == ["img0.png", "img1.png", "img2.png", "img3.png"]
    assert "2 image(s) already" in second.stderr


def test_caption_failures(ckpt, tmp_path):
    (tmp_path / "empty").mkdir()
    one_line_error(run("caption", tmp_path / "empty", "--model", ckpt), "no images found")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"nope")
    result = run("caption", tmp_path / "bad", "--model", ckpt)
    assert result.exit_code == 1 and "unreadable" in result.stderr


def test_detect_boxes_in_original_pixels_and_drawn(ckpt, tmp_path, monkeypatch):
    img = tmp_path / "wide.png"
    Image.new("RGB", (200, 100), "white").save(img)
    said = {}

    def fake_generate(self, images, prompts, opts):
        said["prompt"] = prompts[0]
        # y0=0.25, x0=0.1, y1=0.75, x1=0.5 of the image, then one malformed object that must be skipped
        return ["<loc0256><loc0102><loc0767><loc0512> cat ; <loc0100><loc0100> dog"]

    monkeypatch.setattr(Pipeline, "generate", fake_generate)
    out = tmp_path / "boxes.png"
    result = run("detect", img, "cat ; dog", "--model", ckpt, "--json", "--out", out)
    assert result.exit_code == 0, result.output
    assert said["prompt"] == "detect cat ; dog"
    obj = json.loads(result.stdout)
    assert len(obj["boxes"]) == 1 and obj["boxes"][0]["label"] == "cat"
    x0, y0, x1, y1 = obj["boxes"][0]["box"]
    assert abs(x0 - 20) < 0.5 and abs(y0 - 25) < 0.5 and abs(x1 - 100) < 0.5 and abs(y1 - 75) < 0.5
    drawn = Image.open(out).convert("RGB")
    assert drawn.size == (200, 100)
    assert drawn.getpixel((20, 50)) != (255, 255, 255) and drawn.getpixel((150, 10)) == (255, 255, 255)
    text = run("detect", img, "cat", "--model", ckpt)
    assert text.stdout.splitlines() == ["cat\t20 25 100 75"]


def test_installed_executable_runs(ckpt, image):
    exe = shutil.which("paligemma") or str(Path(sys.executable).parent / "paligemma")
    help_out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert help_out.returncode == 0
    for name in ("ask", "caption", "detect", "download", "train"):
        assert name in help_out.stdout
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    assert version.stdout.startswith("paligemma ")
    answer = subprocess.run([exe, "ask", str(image), "what?", "--model", str(ckpt), "--max-tokens", "3", "--json"],
                            capture_output=True, text=True, timeout=120)
    assert answer.returncode == 0, answer.stderr
    assert "answer" in json.loads(answer.stdout)
    missing = subprocess.run([exe, "ask", "nope.png", "what?", "--model", str(ckpt)], capture_output=True, text=True,
                             timeout=120)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
