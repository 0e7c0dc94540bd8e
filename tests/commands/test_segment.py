"""`paligemma segment`, driven as a user drives it, with the model's answer scripted and a random VQ-VAE:
masks must be what big_vision's decoder and placement give for those tokens."""

import json
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import constants
from PIL import Image
from typer.testing import CliRunner

from paligemma_cli.cli import app
from paligemma_cli.inference.pipeline import Pipeline
from paligemma_cli.processing.segmentation import rle_decode
from tests.fixtures.checkpoints import make_tiny_checkpoint, write_images
from tests.fixtures.cli import one_line_error
from tests.fixtures.vae_oracle import decode_masks, paste_reference, random_vae_params

runner = CliRunner()
CODES = [(i * 37 + 5) % 128 for i in range(16)]
SEGS = "".join(f"<seg{c:03d}>" for c in CODES)
# y0=0.25, x0=0.1, y1=0.75, x1=0.5 (x0 truncates to pixel 19 of 200: 102/1023 < 0.1), then a malformed object (15 seg tokens) that must be skipped, then one
# without a label.
ANSWER = (f"<loc0256><loc0102><loc0767><loc0512>{SEGS} cat ; <loc0100><loc0100><loc0900><loc0900>{SEGS[8:]} dog"
          f" ; <loc0000><loc0600><loc1023><loc1023> {SEGS}")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def params():
    return random_vae_params(1, 8)


@pytest.fixture(scope="module")
def vae(tmp_path_factory, params):
    path = tmp_path_factory.mktemp("vae") / "vae-oid.npz"
    np.savez(path, **params)
    return path


@pytest.fixture
def scripted(monkeypatch):
    said = []

    def fake_generate(self, images, prompts, opts):
        said.extend(prompts)
        return [ANSWER] * len(images)

    monkeypatch.setattr(Pipeline, "generate", fake_generate)
    return said


@pytest.fixture
def wide(tmp_path):
    path = tmp_path / "wide.png"
    Image.new("RGB", (200, 100), "white").save(path)
    return path


def run(*args, **kw):
    return runner.invoke(app, [str(a) for a in args], **kw)


def expected_mask(params, bins, width=200, height=100):
    m64 = decode_masks(params, np.array([CODES]))[0, ..., 0]
    return paste_reference(m64, bins, height, width)


def test_text_output_one_line_per_object(ckpt, vae, params, wide, scripted):
    result = run("segment", wide, "cat ; dog", "--model", ckpt, "--vae", vae)
    assert result.exit_code == 0, result.output
    assert scripted == ["segment cat ; dog"]
    cat = expected_mask(params, (256, 102, 767, 512))
    unlabelled = expected_mask(params, (0, 600, 1023, 1023))
    assert result.stdout.splitlines() == [f"cat\t19 25 100 74\t{cat.sum()}", f"\t117 0 200 100\t{unlabelled.sum()}"]
    assert 0 < cat.sum() < 80 * 49


def test_json_masks_are_big_vision_s(ckpt, vae, params, wide, scripted):
    result = run("segment", wide, "cat", "--model", ckpt, "--vae", vae, "--json")
    assert result.exit_code == 0, result.output
    obj = json.loads(result.stdout)
    assert obj["prompt"] == "segment cat" and obj["raw"] == ANSWER and obj["vae"] == str(vae)
    assert (obj["width"], obj["height"]) == (200, 100)
    first, second = obj["objects"]
    assert first["label"] == "cat" and first["box"] == [19, 25, 100, 74]
    assert second["label"] == "cat"  # no label in the answer: the prompt's only label
    mask = rle_decode(first["mask"])
    np.testing.assert_array_equal(mask, expected_mask(params, (256, 102, 767, 512)))
    assert first["area"] == mask.sum() and first["mask"]["size"] == [100, 200]


def test_overlay_and_mask_files(ckpt, vae, params, wide, tmp_path, scripted):
    out, masks = tmp_path / "overlay.png", tmp_path / "masks"
    result = run("segment", wide, "cat", "--model", ckpt, "--vae", vae, "--out", out, "--masks-dir", masks)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in masks.iterdir()) == ["wide-0-cat.png", "wide-1-cat.png"]
    cat = expected_mask(params, (256, 102, 767, 512))
    np.testing.assert_array_equal(np.asarray(Image.open(masks / "wide-0-cat.png")) > 0, cat)
    drawn = np.asarray(Image.open(out).convert("RGB"))
    assert drawn.shape == (100, 200, 3)
    inside = np.argwhere(cat[30:70, 25:95])[0] + (30, 25)  # a masked pixel away from the box outline
    assert tuple(drawn[tuple(inside)]) != (255, 255, 255)
    assert tuple(drawn[5, 5]) == (255, 255, 255)  # outside every box and mask
    assert "wrote" in result.stderr and "wrote" not in result.stdout


def test_a_folder_gives_records_and_resumes(ckpt, vae, tmp_path, scripted):
    folder = tmp_path / "pics"
    write_images(folder, 3)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    records = tmp_path / "seg.jsonl"
    first = run("segment", folder / "img0.png", folder / "img1.png", "cat", "--model", ckpt, "--vae", vae,
                "--jsonl", records)
    assert first.exit_code == 0, first.output
    assert first.stdout == ""
    again = run("segment", folder, "cat", "--model", ckpt, "--vae", vae, "--jsonl", records, "--resume",
                "--batch-size", 2)
    assert again.exit_code == 0, again.output
    lines = [json.loads(line) for line in records.read_text().splitlines()]
    assert sorted(Path(r["image"]).name for r in lines) == ["img0.png", "img1.png", "img2.png"]
    assert "2 image(s) already" in again.stderr and "broken.jpg" in again.stderr
    assert all(len(r["objects"]) == 2 and r["objects"][0]["mask"]["size"] == [30, 40] for r in lines)
    to_stdout = run("segment", folder / "img*.png", "cat", "--model", ckpt, "--vae", vae)
    assert len(to_stdout.stdout.splitlines()) == 3




def test_bad_input(ckpt, vae, params, wide, tmp_path, monkeypatch, scripted):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))  # no `download --vae` copy of the user's
    monkeypatch.delenv("PALIGEMMA_CONFIG", raising=False)
    one_line_error(run("segment", wide, "cat", "--model", ckpt),
                   f"no VQ-VAE to decode masks with: put vae-oid.npz beside the model in {ckpt}")
    one_line_error(run("segment", wide, " ; ", "--model", ckpt, "--vae", vae), "say what to segment")
    one_line_error(run("segment", tmp_path / "nope.png", "cat", "--model", ckpt, "--vae", vae), "nope.png")
    corrupt = tmp_path / "bad.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    one_line_error(run("segment", corrupt, "cat", "--model", ckpt, "--vae", vae), "cannot read image")
    wrong = dict(params, **{"decoder.6.weight": np.zeros((128, 32, 4, 4), np.float32)})
    np.savez(tmp_path / "wrong.npz", **wrong)
    one_line_error(run("segment", wide, "cat", "--model", ckpt, "--vae", tmp_path / "wrong.npz"),
                   "'decoder.6.weight' has shape (128, 32, 4, 4), expected (128, 64, 4, 4)")
    np.savez(tmp_path / "other.npz", w=np.zeros(3))
    one_line_error(run("segment", wide, "cat", "--model", ckpt, "--vae", tmp_path / "other.npz"),
                   "not a PaliGemma VQ-VAE checkpoint")
    (tmp_path / "text.npz").write_text("hello")
    one_line_error(run("segment", wide, "cat", "--model", ckpt, "--vae", tmp_path / "text.npz"), "not a readable .npz")
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, **dict(params, **{"decoder.0.bias": np.array([object()] * 128)}))
    one_line_error(run("segment", wide, "cat", "--model", ckpt, "--vae", pickled), "pickled.npz")
    one_line_error(run("segment", wide, "cat", "--model", ckpt, "--vae", vae, "--resume"), "--resume needs --jsonl")
    folder = tmp_path / "pics"
    write_images(folder, 2)
    one_line_error(run("segment", folder, "cat", "--model", ckpt, "--vae", vae, "--out", tmp_path / "x.png"),
                   "--out draws one image")


def test_nothing_found_says_what_the_model_said(ckpt, vae, wide, monkeypatch):
    monkeypatch.setattr(Pipeline, "generate", lambda self, images, prompts, opts: ["no idea"])
    result = run("segment", wide, "cat", "--model", ckpt, "--vae", vae)
    assert result.exit_code == 0 and result.stdout == "" and "no idea" in result.stderr


def test_no_output_lands_on_an_input(ckpt, vae, wide, tmp_path, scripted):
    before = wide.read_bytes()
    one_line_error(run("segment", wide, "cat", "--model", ckpt, "--vae", vae, "--out", wide), "is one of the inputs")
    one_line_error(run("segment", wide, "cat", "--model", ckpt, "--vae", vae, "--jsonl", wide), "is one of the inputs")
    one_line_error(run("segment", wide, "cat", "--model", ckpt, "--vae", vae, "--masks-dir", tmp_path),
                   "holds the input")
    assert wide.read_bytes() == before
    one_line_error(run("segment", wide, "\udcff cat", "--model", ckpt, "--vae", vae), "not valid UTF-8")


def test_resume_cuts_a_torn_record_and_knows_a_path_however_spelled(ckpt, vae, tmp_path, scripted, monkeypatch):
    folder = tmp_path / "pics"
    write_images(folder, 3)
    records = tmp_path / "seg.jsonl"
    first = run("segment", folder / "img0.png", folder / "img1.png", "cat", "--model", ckpt, "--vae", vae,
                "--jsonl", records)
    assert first.exit_code == 0, first.output
    whole = records.read_text().splitlines()
    records.write_text(whole[0] + "\n" + whole[1][:40])  # killed while writing the second record
    monkeypatch.chdir(folder)
    again = run("segment", "img0.png", "./img1.png", "img2.png", "cat", "--model", ckpt, "--vae", vae,
                "--jsonl", records, "--resume")
    assert again.exit_code == 0, again.output
    lines = [json.loads(line) for line in records.read_text().splitlines()]  # every line parses
    assert [Path(r["image"]).name for r in lines] == ["img0.png", "img1.png", "img2.png"]
    assert "1 image(s) already" in again.stderr


def test_images_of_the_same_name_keep_their_own_mask_files(ckpt, vae, tmp_path, scripted):
    for i, sub in enumerate(["a", "b"]):
        (tmp_path / "pics" / sub).mkdir(parents=True)
        Image.new("RGB", (40 + 20 * i, 30), "white").save(tmp_path / "pics" / sub / "same.png")
    result = run("segment", tmp_path / "pics", "cat", "--recursive", "--model", ckpt, "--vae", vae,
                 "--masks-dir", tmp_path / "masks")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    files = [Path(obj["mask_file"]) for r in records for obj in r["objects"]]
    assert len(files) == len(set(files)) == 4  # two objects per image, none written over
    for r in records:
        for obj in r["objects"]:
            assert Image.open(obj["mask_file"]).size == (r["width"], r["height"])
