"""`paligemma train --objective vqvae`: a few steps on shapes masks, the checkpoint it writes, resume."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from paligemma_cli.checkpoints.vae import load_vae
from paligemma_cli.cli import app
from paligemma_cli.data.shapes import write_dataset
from paligemma_cli.errors import PaliGemmaError
from paligemma_cli.training.vqvae import VQVAETrainConfig, VQVAETrainer, read_mask_crops


@pytest.fixture(scope="module")
def masks(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("masks"), 24, seed=3, tasks=["mask"])


def settings(tmp_path, masks, **kw):
    return VQVAETrainConfig.from_dict(dict(data=str(masks), out=str(tmp_path / "run"), steps=4, batch_size=8,
                                           codebook_dim=8, save_every=2, log_every=1, warmup_steps=1, **kw))


def test_crops_are_the_masks_stretched_box(masks):
    crops, skipped = read_mask_crops(str(masks))
    assert crops.shape == (24, 64, 64) and crops.dtype == torch.uint8 and skipped == 0
    # Every shape touches all four sides of its box, so each crop is mostly object somewhere on every edge
    # (a triangle's apex is one pixel, blurred by the stretch).
    for edge in (crops[:, 0], crops[:, -1], crops[:, :, 0], crops[:, :, -1]):
        assert (edge.amax(1) > 127).all()


def test_a_run_writes_a_vae_oid_checkpoint_and_resumes_exactly(tmp_path, masks):
    summary = VQVAETrainer(settings(tmp_path, masks, val_data=str(masks), eval_every=2)).run()
    assert summary["steps"] == 4 and np.isfinite(summary["loss"])
    model, has_encoder = load_vae(tmp_path / "run" / "vae-oid.npz")
    assert has_encoder and model.dim == 8
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [1, 2, 3, 4] and "val_iou" in logged[1] and 0 <= logged[1]["val_iou"] <= 1

    other = tmp_path / "other"
    VQVAETrainer(VQVAETrainConfig.from_dict({**settings(other, masks).to_dict(), "steps": 2})).run()
    resumed = VQVAETrainer(settings(other, masks), resume=True)
    assert resumed.state.step == 2
    resumed.run()
    a = load_vae(tmp_path / "run" / "vae-oid.npz")[0].state_dict()
    b = load_vae(other / "run" / "vae-oid.npz")[0].state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_the_command_and_its_errors(tmp_path, masks):
    result = CliRunner().invoke(app, ["train", str(masks), "--objective", "vqvae", "--steps", "2", "--batch-size", "4",
                                      "--out", str(tmp_path / "run"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["steps"] == 2 and "iou" in json.loads(result.stdout)
    bad = CliRunner().invoke(app, ["train", str(masks), "--objective", "vqvae", "--model-config", "demo-64",
                                   "--out", str(tmp_path / "x")])
    assert bad.exit_code == 1 and "do not apply to --objective vqvae" in bad.stderr
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"image": "nope.png", "prefix": "", "suffix": ""}) + "\n")
    with pytest.raises(PaliGemmaError, match="names no readable, non-empty mask image"):
        VQVAETrainer(VQVAETrainConfig.from_dict(dict(data=str(empty), out=str(tmp_path / "e"))))
