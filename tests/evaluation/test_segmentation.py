"""`segment` scoring as big_vision's RefCOCO evaluator does it: mean per-example mask IoU at the original
resolution, invalid answers as 0, box accuracy at IoU 0.5; then `paligemma eval` end to end."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from paligemma_cli.cli import app
from paligemma_cli.data.jsonl import Example
from paligemma_cli.errors import PaliGemmaError
from paligemma_cli.evaluation.evaluate import evaluate, score, score_example
from paligemma_cli.inference.generate import SamplingOptions
from paligemma_cli.inference.pipeline import Pipeline
from paligemma_cli.inference.segmentation import MaskCodec
from paligemma_cli.processing.segmentation import format_segmentation
from tests.fixtures.checkpoints import make_tiny_checkpoint
from tests.fixtures.vae_oracle import decode_masks, paste_reference, random_vae_params

W, H = 80, 60
CODES_A = [(i * 37 + 5) % 128 for i in range(16)]
CODES_B = [(i * 11 + 90) % 128 for i in range(16)]
BOX = (0.2, 0.1, 0.8, 0.7)  # y0, x0, y1, x1


@pytest.fixture(scope="module")
def params():
    return random_vae_params(2, 8)


@pytest.fixture(scope="module")
def vae_path(tmp_path_factory, params):
    path = tmp_path_factory.mktemp("vae") / "vae-oid.npz"
    np.savez(path, **params)
    return path


@pytest.fixture(scope="module")
def codec(vae_path):
    return MaskCodec.load(vae_path)


def oracle_mask(params, codes, text):
    bins = [int(t[4:8]) for t in text.split(">")[:4] for t in [t + ">"]]
    return paste_reference(decode_masks(params, np.array([codes]))[0, ..., 0], bins, H, W)


def gt_file(tmp_path, mask, name="gt.png"):
    path = tmp_path / name
    Image.fromarray(mask.astype(np.uint8) * 255, "L").save(path)
    return path


def test_iou_against_the_mask_file(tmp_path, params, codec):
    reference = format_segmentation(BOX, CODES_A, "cat")
    gt = np.zeros((H, W), bool)
    gt[10:50, 5:60] = True
    example = Example(Path("img.png"), "segment cat", reference, mask=gt_file(tmp_path, gt))
    prediction = format_segmentation((0.25, 0.1, 0.8, 0.75), CODES_B, "cat")
    pred = oracle_mask(params, CODES_B, prediction)
    expected = (pred & gt).sum() / (pred | gt).sum()
    got = score_example(prediction, example, (W, H), codec)
    assert got["iou"] == pytest.approx(expected) and 0.05 < expected < 0.95
    assert got["valid"] == 1.0
    y0, x0, y1, x1 = (round(v * 1023) / 1023 for v in (0.25, 0.1, 0.8, 0.75))
    g0, g1, g2, g3 = (round(v * 1023) / 1023 for v in BOX)
    inter = (min(y1, g2) - max(y0, g0)) * (min(x1, g3) - max(x0, g1))
    union = (y1 - y0) * (x1 - x0) + (g2 - g0) * (g3 - g1) - inter
    assert got["box_iou"] == pytest.approx(inter / union)


def test_without_a_mask_file_the_reference_tokens_are_the_truth(codec):
    reference = format_segmentation(BOX, CODES_A, "cat")
    example = Example(Path("img.png"), "segment cat", reference)
    assert score_example(reference, example, (W, H), codec) == {"iou": 1.0, "box_iou": 1.0, "valid": 1.0}


@pytest.mark.parametrize("prediction", [
    "no idea",
    "<loc0100><loc0100><loc0500><loc0500> cat",  # a detection, no mask tokens
    format_segmentation((0.8, 0.1, 0.2, 0.7), CODES_A, "cat"),  # ymax < ymin
    format_segmentation(BOX, CODES_A[:15], "cat"),
])
def test_invalid_answers_score_zero(prediction, codec):
    example = Example(Path("img.png"), "segment cat", format_segmentation(BOX, CODES_A, "cat"))
    assert score_example(prediction, example, (W, H), codec) == {"iou": 0.0, "box_iou": 0.0, "valid": 0.0}


def test_valid_tokens_that_truncate_to_no_pixel_are_invalid_but_keep_their_box(codec):
    example = Example(Path("img.png"), "segment cat", format_segmentation((0.0, 0.0, 0.01, 0.01), CODES_A, "cat"))
    tiny = "<loc0000><loc0000><loc0010><loc0010>" + "".join(f"<seg{c:03d}>" for c in CODES_A)  # 10/1023*60 < 1
    got = score_example(tiny, example, (W, H), codec)
    assert got["valid"] == 0.0 and got["iou"] == 0.0 and got["box_iou"] > 0.5


def test_the_first_object_is_scored(codec):
    reference = format_segmentation(BOX, CODES_A, "cat")
    example = Example(Path("img.png"), "segment cat", reference)
    assert score_example(f"{reference} ; no", example, (W, H), codec)["iou"] == 1.0
    assert score_example(f"junk ; {reference}", example, (W, H), codec)["iou"] == 0.0


def test_the_task_score_is_the_mean_of_per_example_ious(codec):
    big = format_segmentation((0.0, 0.0, 1.0, 1.0), CODES_A, "cat")
    examples = [Example(Path("a.png"), "segment cat", big, task="segment"),
                Example(Path("b.png"), "segment cat", format_segmentation(BOX, CODES_A, "cat"), task="segment"),
                Example(Path("c.png"), "segment cat", big, task="segment")]
    predictions = [big, format_segmentation((0.2, 0.1, 0.5, 0.7), CODES_A, "cat"), "nothing"]
    per_example = [score_example(p, e, (W, H), codec) for p, e in zip(predictions, examples)]
    result = score(predictions, examples, [(W, H)] * 3, codec)["segment"]
    assert result.kind == "segment" and result.n == 3
    assert result.metrics["miou"] == pytest.approx(100 * sum(s["iou"] for s in per_example) / 3)
    assert 0 < per_example[1]["iou"] < 1  # a pooled IoU would weigh the big first mask far more
    assert result.metrics["boxacc"] == pytest.approx(100 * (1 + (per_example[1]["box_iou"] >= 0.5)) / 3)
    assert result.metrics["invalid"] == pytest.approx(100 / 3)


def test_segment_scoring_needs_a_vae():
    example = Example(Path("img.png"), "segment cat", "x", task="segment")
    with pytest.raises(PaliGemmaError, match="needs the VQ-VAE"):
        score_example("x", example, (W, H))

    class NoModel:
        def generate(self, *a):
            raise AssertionError("generated before the missing VQ-VAE was noticed")

    with pytest.raises(PaliGemmaError, match="needs the VQ-VAE"):
        evaluate(NoModel(), [example], SamplingOptions())


def test_eval_command_scores_segment_lines(tmp_path, vae_path, params, monkeypatch):
    ckpt = make_tiny_checkpoint(tmp_path / "model")
    (tmp_path / "images").mkdir()
    reference = format_segmentation(BOX, CODES_A, "cat")
    gt = oracle_mask(params, CODES_A, reference)
    lines = []
    for i in range(2):
        Image.new("RGB", (W, H), "white").save(tmp_path / "images" / f"{i}.png")
        gt_file(tmp_path, gt, f"m{i}.png")
        lines.append(json.dumps({"image": f"images/{i}.png", "mask": f"m{i}.png", "prefix": "segment cat",
                                 "suffix": reference, "task": "segment"}))
    lines.append(json.dumps({"image": "images/0.png", "prefix": "answer en what?", "suffix": "cat", "task": "vqa"}))
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")
    said = {"segment cat": [reference, "garbage"], "answer en what?": ["cat"]}
    monkeypatch.setattr(Pipeline, "generate", lambda self, images, prompts, opts: [said[p].pop(0) for p in prompts])
    result = CliRunner().invoke(app, ["eval", str(data), "--model", str(ckpt), "--vae", str(vae_path), "--json",
                                      "--batch-size", "1"])
    assert result.exit_code == 0, result.output
    tasks = json.loads(result.stdout)["tasks"]
    assert tasks["segment"] == {"miou": 50.0, "boxacc": 50.0, "invalid": 50.0, "n": 2}
    assert tasks["vqa"]["exact_match"] == 100.0
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PALIGEMMA_CONFIG", raising=False)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    missing = CliRunner().invoke(app, ["eval", str(data), "--model", str(ckpt)])
    assert missing.exit_code == 1 and "no VQ-VAE to decode masks" in missing.stderr
    said["answer en what?"] = ["cat"]
    table = CliRunner().invoke(app, ["eval", str(data), "--model", str(ckpt), "--vae", str(vae_path), "--task",
                                     "vqa"])
    assert table.exit_code == 0, table.output  # no segment line selected: no VQ-VAE needed
