
"""Bad input and failing writes, as a user meets them: one `error:` line and a non-zero exit, nothing
of theirs overwritten, and a job that keeps going past one bad file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
from typer.testing import CliRunner

from paligemma_cli.cli import app
from tests.fixtures.bad_inputs import png_bomb
from tests.fixtures.checkpoints import make_tiny_checkpoint, write_images
from tests.fixtures.cli import one_line_error

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


def run(*args, **kw):
    return runner.invoke(app, [str(a) for a in args], **kw)


one_line_error = partial(one_line_error, exit_code=None, stdout=None)


def paligemma(*args, env=None, **kw) -> subprocess.CompletedProcess:
    """The real entry point in a child process (stdout redirections, invalid UTF-8 in argv)."""
    return subprocess.run([sys.executable, "-m", "paligemma_cli", *args], capture_output=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, **kw)


# --- outputs never destroy inputs ----------------------------------------------------------------------------


def test_caption_refuses_to_write_over_its_input_image(ckpt, tmp_path):
    [image] = write_images(tmp_path, 1)
    before = image.read_bytes()
    one_line_error(run("caption", image, "--out", image, "--model", ckpt), "one of the inputs")
    assert image.read_bytes() == before


def test_detect_refuses_to_draw_over_its_input_image(ckpt, tmp_path):
    [image] = write_images(tmp_path, 1)
    before = image.read_bytes()
    one_line_error(run("detect", image, "cat", "--out", image, "--model", ckpt), "one of the inputs")
    assert image.read_bytes() == before


def test_eval_refuses_to_write_predictions_over_its_dataset(ckpt, tmp_path):
    [image] = write_images(tmp_path, 1)
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"image": image.name, "prefix": "caption en", "suffix": "x"}) + "\n")
    before = data.read_bytes()
    one_line_error(run("eval", data, "--predictions", data, "--model", ckpt), "one of the inputs")
    one_line_error(run("eval", data, "--predictions", image, "--model", ckpt), "one of the inputs")
    assert data.read_bytes() == before


def test_chat_save_refuses_to_write_over_an_image_and_keeps_the_session(ckpt, tmp_path):
    [image, other] = write_images(tmp_path, 2)
    before = other.read_bytes()
    lines = f"what?\n/save {image}\n/save {other}\nwhat?\n/save {tmp_path / 't.txt'}\n/save {tmp_path / 't.txt'}\n"
    result = run("chat", image, "--model", ckpt, "--max-tokens", 2, input=lines)
    assert result.exit_code == 0, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "one of the inputs" in errors[0] and "not a chat transcript" in errors[1]
    assert other.read_bytes() == before and len(result.stdout.splitlines()) == 2
    assert (tmp_path / "t.txt").read_text().startswith("# paligemma chat transcript")  # and replaced once more


# --- one bad file never aborts a whole job ---------------------------------------------------------------


def test_a_decompression_bomb_is_one_line_everywhere(ckpt, tmp_path):
    bomb = png_bomb(tmp_path / "bomb.png")
    one_line_error(run("ask", bomb, "what?", "--model", ckpt), "too large")
    one_line_error(run("detect", bomb, "cat", "--model", ckpt), "too large")
    result = run("chat", "--model", ckpt, input=f"/image {bomb}\n")
    assert result.exit_code == 0 and "too large" in result.stderr and "Traceback" not in result.output


def test_eval_and_train_skip_a_bomb_and_go_on(ckpt, tmp_path):
    good = write_images(tmp_path, 4)
    bomb = png_bomb(tmp_path / "bomb.png")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"image": p.name, "prefix": "caption en", "suffix": "x"}) + "\n"
                            for p in [*good, bomb]))
    result = run("eval", data, "--model", ckpt, "--max-tokens", 2, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["n"] == 4 and json.loads(result.stdout)["skipped"] == 1
    assert "too large" in " ".join(result.stderr.split())  # Rich wraps long lines
    result = run("train", data, "--model-config", "tiny-32", "--out", tmp_path / "run", "--steps", 3,
                 "--batch-size", 5, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["skipped_images"] == 1  # the bomb, counted once


def test_caption_skips_a_bomb_and_writes_the_good_images_of_its_batch(ckpt, tmp_path):
    good = write_images(tmp_path / "in", 3)
    png_bomb(tmp_path / "in" / "img1b.png")
    out = tmp_path / "captions.jsonl"
    result = run("caption", tmp_path / "in", "--out", out, "--model", ckpt, "--max-tokens", 3, "--batch-size", 8)
    assert result.exit_code == 0, result.output
    assert sorted(json.loads(line)["image"] for line in out.read_text().splitlines()) == sorted(map(str, good))
    assert "too large" in result.stderr and "DecompressionBomb" not in result.stderr


def test_the_pixel_limit_is_a_setting(ckpt, tmp_path, monkeypatch):
    [image] = write_images(tmp_path, 1, size=(40, 30))
    monkeypatch.setenv("PALIGEMMA_MAX_PIXELS", "1000")
    one_line_error(run("ask", image, "what?", "--model", ckpt), "limit is 0 MP")
    monkeypatch.setenv("PALIGEMMA_MAX_PIXELS", "lots")
    one_line_error(run("ask", image, "what?", "--model", ckpt), "PALIGEMMA_MAX_PIXELS")


def test_pillows_own_bomb_warning_is_not_printed(tmp_path, monkeypatch):
    from PIL import Image

    from paligemma_cli.processing.image import load_image

    [image] = write_images(tmp_path, 1, size=(40, 30))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow would warn on these 1200 pixels
    with _no_warnings():
        assert load_image(image).size == (40, 30)


class _no_warnings:
    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings(record=True)
        self.caught = self._ctx.__enter__()
        warnings.simplefilter("always")

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        assert not self.caught, [str(w.message) for w in self.caught]


def test_caption_writes_names_that_are_not_utf8_and_resumes_them(ckpt, tmp_path):
    folder = tmp_path / "in"
    [image] = write_images(folder, 1)
    odd = Path(os.fsdecode(bytes(folder) + b"/b\xff.png"))
    odd.write_bytes(image.read_bytes())
    out = tmp_path / "c.jsonl"
    result = run("caption", folder, "--out", out, "--model", ckpt, "--max-tokens", 3)
    assert result.exit_code == 0, result.output
    names = [json.loads(line)["image"] for line in out.read_text(encoding="utf-8").splitlines()]
    assert sorted(names) == sorted([str(image), str(odd)])
    result = run("caption", folder, "--out", out, "--model", ckpt, "--max-tokens", 3, "--resume")
    assert result.exit_code == 0 and "0 to go" in result.stderr
    for fmt in ("txt", "csv"):
        result = run("caption", folder, "--format", fmt, "--out", tmp_path / f"c.{fmt}", "--model", ckpt,
                     "--max-tokens", 3)
        assert result.exit_code == 0, result.output
        assert b"b\xff.png" in (tmp_path / f"c.{fmt}").read_bytes()  # the name, byte for byte


# --- resume -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "txt"])
def test_caption_resume_drops_a_torn_last_record(ckpt, tmp_path, fmt):
    images = write_images(tmp_path / "in", 3)
    out = tmp_path / f"c.{fmt}"
    assert run("caption", *images[:2], "--format", fmt, "--out", out, "--model", ckpt, "--max-tokens", 3).exit_code == 0
    whole = out.read_bytes()
    out.write_bytes(whole[:-7])  # killed while writing the second record
    result = run("caption", *images, "--format", fmt, "--out", out, "--model", ckpt, "--max-tokens", 3, "--resume")
    assert result.exit_code == 0, result.output
    assert "1 image(s) already" in result.stderr
    text = out.read_text()
    if fmt == "jsonl":
        records = [json.loads(line)["image"] for line in text.splitlines()]  # every line parses
    elif fmt == "csv":
        import csv
        import io

        rows = list(csv.reader(io.StringIO(text)))
        assert rows[0] == ["image", "caption"] and all(len(r) == 2 for r in rows)
        records = [r[0] for r in rows[1:]]
    else:
        records = [line.split("\t")[0] for line in text.splitlines()]
        assert all(line.count("\t") == 1 for line in text.splitlines())
    assert sorted(records) == sorted(map(str, images))  # each exactly once


def test_caption_resume_matches_images_however_their_path_is_spelled(ckpt, tmp_path, monkeypatch):
    write_images(tmp_path / "in", 2)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "c.jsonl"
    assert run("caption", "in", "--out", out, "--model", ckpt, "--max-tokens", 3).exit_code == 0
    result = run("caption", tmp_path / "in", "--out", out, "--model", ckpt, "--max-tokens", 3, "--resume")
    assert result.exit_code == 0 and "0 to go" in result.stderr
    assert len(out.read_text().splitlines()) == 2


# --- write errors -------------------------------------------------------------------------------------


def test_unwritable_outputs_are_one_line(ckpt, tmp_path):
    [image] = write_images(tmp_path / "in", 1)
    one_line_error(run("caption", image, "--out", tmp_path / "missing" / "c.jsonl", "--model", ckpt),
                   "does not exist")
    one_line_error(run("caption", image, "--out", tmp_path, "--model", ckpt), "is a folder")
    (tmp_path / "file").write_text("x")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"image": str(image), "prefix": "caption en", "suffix": "x"}) + "\n")
    one_line_error(run("eval", data, "--predictions", tmp_path, "--model", ckpt), "is a folder")
    one_line_error(run("train", data, "--model-config", "tiny-32", "--out", tmp_path / "file"), "is a file")


def test_a_place_that_cannot_be_written_is_one_line(ckpt, tmp_path):
    [image] = write_images(tmp_path / "in", 1)
    if os.geteuid() == 0:  # root writes into read-only folders, but not into sysfs
        place = Path("/sys")
    else:
        place = tmp_path / "locked"
        place.mkdir(mode=0o500)
    if not place.is_dir():
        pytest.skip("no read-only folder to write into")
    one_line_error(run("caption", image, "--out", place / "c.jsonl", "--model", ckpt), "permission denied")


def test_an_output_file_on_a_full_device_is_one_line(ckpt, tmp_path):
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    [image] = write_images(tmp_path, 1)
    result = run("caption", image, "--out", "/dev/full", "--model", ckpt, "--max-tokens", 2)
    last = result.stderr.strip().splitlines()[-1]
    assert result.exit_code == 1 and last.startswith("error: cannot write '/dev/full': no space left")
    assert "Traceback" not in result.output


def test_stdout_on_a_full_device_is_one_line(tmp_path):
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    for args in (["ask", "examples/shapes.png", "what color is the circle?"],
                 ["ask", "examples/shapes.png", "what color is the circle?", "--json"]):
        with open("/dev/full", "w") as full:
            proc = subprocess.run([sys.executable, "-m", "paligemma_cli", *args], stdout=full, stderr=subprocess.PIPE,
                                  text=True, cwd=ROOT)
        lines = [line for line in proc.stderr.splitlines() if line.strip() and "tok/s" not in line]
        assert proc.returncode == 1 and lines and lines[-1].startswith("error:") and "no space left" in lines[-1]
        assert "Traceback" not in proc.stderr


def test_debug_variable_shows_the_traceback(tmp_path):
    proc = paligemma("ask", str(tmp_path / "missing.png"), "what?", env={"PALIGEMMA_DEBUG": "1"}, text=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "PaliGemmaError" in proc.stderr
    proc = paligemma("ask", str(tmp_path / "missing.png"), "what?", text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr


# --- values checked before they do harm ------------------------------------------------------------------


def test_text_that_is_not_utf8_is_refused_in_one_line(ckpt, tmp_path):
    [image] = write_images(tmp_path, 1)
    bad = "what\udcff?"  # how Python hands over argv bytes that are not UTF-8
    one_line_error(run("ask", image, bad, "--model", ckpt), "not valid UTF-8")
    one_line_error(run("ask", image, "--prompt", bad, "--model", ckpt), "not valid UTF-8")
    one_line_error(run("detect", image, bad, "--model", ckpt), "not valid UTF-8")
    one_line_error(run("caption", image, "--prompt", bad, "--model", ckpt), "not valid UTF-8")
    one_line_error(run("classify", image, bad + ",a cat", "--model", ckpt), "not valid UTF-8")
    proc = paligemma("ask", str(image), os.fsdecode(b"what\xff?"), "--model", str(ckpt), text=True)
    assert proc.returncode == 1 and "not valid UTF-8" in proc.stderr and "Traceback" not in proc.stderr


def test_piped_chat_answers_a_bad_line_with_an_error_and_goes_on(ckpt, tmp_path):
    [image] = write_images(tmp_path, 1)
    proc = paligemma("chat", str(image), "--model", str(ckpt), "--max-tokens", "2",
                     input=b"first?\nbad \xff line\n/set seed 99999999999999999999999\nlast?\n")
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 3  # one line per question, the bad one empty
    assert proc.stdout.splitlines()[1] == b""
    errors = [line for line in proc.stderr.decode().splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "UTF-8" in errors[0] and "--seed" in errors[1]


def test_sampling_values_out_of_range_are_refused(ckpt, tmp_path):
    [image] = write_images(tmp_path, 1)
    one_line_error(run("ask", image, "q", "--model", ckpt, "--seed", 2**64), "--seed")
    one_line_error(run("ask", image, "q", "--model", ckpt, "--temperature", "inf"), "finite")
    result = run("ask", image, "q", "--model", ckpt, "--temperature", "nan")  # caught by the option's own bound
    assert result.exit_code == 2 and "--temperature" in result.stderr and "Traceback" not in result.output
    one_line_error(run("ask", image, "q", "--model", ckpt, "--max-tokens", 9000), "no room for the prompt")
    one_line_error(run("chat", image, "--model", ckpt, "--max-tokens", 9000, input="q\n"), "no room for the prompt")


@pytest.mark.parametrize("flags, needle", [
    (["--lora-r", "0", "--model", "BASE"], "--lora-r"),
    (["--lora-r", "-2", "--model", "BASE"], "--lora-r"),
    (["--lr", "-1", "--model-config", "tiny-32"], "--lr"),
    (["--lr", "nan", "--model-config", "tiny-32"], "--lr"),
    (["--config", "NAN_YAML", "--model-config", "tiny-32"], "--lr"),
    (["--model-config", "no-such-config"], "unknown model config"),
    (["--model-config", "tiny-32", "--init-vision", "MISSING"], "does not exist"),
])
def test_bad_training_settings_fail_before_training_and_leave_nothing(ckpt, tmp_path, flags, needle):
    [image] = write_images(tmp_path / "in", 1)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"image": str(image), "prefix": "caption en", "suffix": "x"}) + "\n")
    (tmp_path / "nan.yaml").write_text("lr: .nan\n")
    subs = {"BASE": str(ckpt), "NAN_YAML": str(tmp_path / "nan.yaml"), "MISSING": str(tmp_path / "nowhere")}
    result = run("train", data, "--out", tmp_path / "run", "--batch-size", 1, *[subs.get(f, f) for f in flags])
    one_line_error(result, needle)
    assert not (tmp_path / "run").exists()


def test_a_suffix_too_long_for_max_length_fails_and_leaves_no_run_folder(tmp_path):
    [image] = write_images(tmp_path / "in", 1)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"image": str(image), "prefix": "caption en", "suffix": "a long caption " * 20}) + "\n")
    result = run("train", data, "--model-config", "tiny-32", "--out", tmp_path / "run", "--batch-size", 1,
                 "--max-length", 20, "--steps", 1)
    one_line_error(result, "tokens")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("change, needle", [
    (lambda c: c["text_config"].__setitem__("hidden_size", "wide"), "text_config.hidden_size must be int"),
    (lambda c: c.__setitem__("vision_config", [1, 2]), "vision_config must be a JSON object"),
    (lambda c: c["vision_config"].__setitem__("num_attention_heads", 0), "at least 1"),
    (lambda c: c["text_config"].__setitem__("num_key_value_heads", 3), "key/value heads"),
])
def test_a_config_json_with_wrong_values_is_one_line(ckpt, tmp_path, change, needle):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(ckpt, folder)
    cfg = json.loads((folder / "config.json").read_text())
    change(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))
    [image] = write_images(tmp_path, 1)
    one_line_error(run("ask", image, "q", "--model", folder), needle)
