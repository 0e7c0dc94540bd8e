"""Contrastive (SigLIP / CLIP) training of the dual encoder: the loss goes down, resume is exact, the run
folder is a checkpoint the other commands load, and bad settings fail before any step.

Runs train the `siglip-tiny-32` preset from scratch on the caption lines of a few shapes-world scenes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from paligemma_cli.checkpoints.hf import load_dual_encoder, load_vision_tower_state
from paligemma_cli.commands.eval import retrieval_eval
from paligemma_cli.data.shapes import write_dataset
from paligemma_cli.errors import PaliGemmaError
from paligemma_cli.model.config import PaliGemmaConfig
from paligemma_cli.model.paligemma import PaliGemma
from paligemma_cli.processing.siglip_tokenizer import SiglipTokenizer
from paligemma_cli.training.contrastive import (
    ContrastiveTrainConfig,
    ContrastiveTrainer,
    contrastive_loss,
    run_contrastive_training,
)
from paligemma_cli.training.resume_state import load_state


class Crash(Exception):
    """Stands for a run killed between checkpoints (no handler runs, unlike Ctrl-C)."""


@pytest.fixture(autouse=True)
def one_thread():
    # Models this small run faster on one thread, and far faster on a loaded machine, where OpenMP
    # threads spin waiting for each other.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """The mixed-task shapes file: 400 scenes, of which 80 are caption lines."""
    return write_dataset(tmp_path_factory.mktemp("shapes"), 400, seed=0, image_size=32)


@pytest.fixture(scope="module")
def captions(shapes) -> Path:
    """Only the caption lines, as an image-caption file would be."""
    lines = [line for line in shapes.read_text().splitlines() if json.loads(line)["task"] == "caption"]
    path = shapes.with_name("captions.jsonl")
    path.write_text("\n".join(lines) + "\n")
    return path


def settings(data: Path, out: Path, **kw) -> dict:
    s = dict(data=str(data), out=str(out), model_config="siglip-tiny-32", steps=8, batch_size=16, lr=3e-3,
             warmup_steps=2, precision="fp32", log_every=1, save_every=100)
    return {**s, **kw}


def train(s: dict, resume: bool = False, stop_at: int | None = None, stop_with=KeyboardInterrupt):
    """(trainer, summary or None, losses): run to the end, or raise `stop_with` at step `stop_at`."""
    losses = []

    def on_log(m):
        losses.append(m["loss"])
        if m["step"] == stop_at:
            raise stop_with()

    trainer = ContrastiveTrainer(ContrastiveTrainConfig.from_dict(s), on_log=on_log, resume=resume)
    try:
        return trainer, trainer.run(), losses
    except (KeyboardInterrupt, Crash):
        return trainer, None, losses


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def mean(xs):
    return sum(xs) / len(xs)


@pytest.fixture(scope="module")
def siglip_run(captions, tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("siglip") / "run"
    return (out, *train(settings(captions, out, steps=60, warmup_steps=5)))


def test_siglip_from_scratch_lowers_the_loss(siglip_run):
    out, trainer, summary, losses = siglip_run
    assert summary["steps"] == 60 and len(losses) == 60
    # Step 1 sees SigLIP's init (bias -10: every pair "negative", so the B positives cost ~10 each).
    assert mean(losses[-10:]) < 0.5 * losses[0]
    assert mean(losses[-10:]) < mean(losses[5:15])  # and it keeps going down after the first drop
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == list(range(1, 61))
    assert {"loss", "lr", "grad_norm", "temperature", "bias", "examples_per_s"} <= logged[-1].keys()


def test_the_run_folder_is_a_dual_encoder_checkpoint(siglip_run):
    out, trainer, _, _ = siglip_run
    assert {"config.json", "model.safetensors", "tokenizer.model", "train_config.yaml", "trainer_state.json"} <= {
        p.name for p in out.iterdir()}
    loaded = load_dual_encoder(out)
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v.cpu()), k
    assert json.loads((out / "config.json").read_text())["model_type"] == "siglip"
    tok = SiglipTokenizer.from_folder(out, loaded.config.text)
    ids = tok(["A red circle."])
    assert ids.shape == (1, 16) and ids[0, -1] == tok.pad_id == tok.eos_id == 1
    # Same keys as save_dual_encoder writes.
    assert load_file(out / "model.safetensors").keys() == loaded.state_dict().keys()
    # `paligemma train --init-vision RUN` takes the image tower into a PaliGemma of the matching preset.
    pg = PaliGemma(PaliGemmaConfig.from_name("tiny-32"))
    pg.vision_tower.load_state_dict(load_vision_tower_state(out), strict=True)


def test_retrieval_eval_of_the_run(siglip_run, shapes):
    out = siglip_run[0]
    result = retrieval_eval(shapes, str(out), batch_size=32, limit=None, device="cpu", dtype="fp32")
    assert result["n"] == 80 and result["skipped"] == 0  # the caption lines of the mixed file
    for side in ("image_to_text", "text_to_image"):
        assert 0 <= result[side]["r1"] <= result[side]["r5"] <= 100


def test_mixed_task_files_train_on_their_caption_lines_only(shapes, captions, tmp_path):
    a = ContrastiveTrainer(ContrastiveTrainConfig.from_dict(settings(shapes, tmp_path / "a")))
    b = ContrastiveTrainer(ContrastiveTrainConfig.from_dict(settings(captions, tmp_path / "b")))
    assert len(a.examples) == len(b.examples) == 80
    assert torch.equal(a.input_ids, b.input_ids)


@pytest.mark.parametrize("hard_negatives", [0, 2])
def test_resume_after_a_crash_ends_exactly_where_an_uninterrupted_run_does(captions, tmp_path, hard_negatives):
    whole, _, whole_losses = train(settings(captions, tmp_path / "whole", hard_negatives=hard_negatives))
    cfg = settings(captions, tmp_path / "split", save_every=2, hard_negatives=hard_negatives)
    _, summary, first = train(cfg, stop_at=5, stop_with=Crash)  # dies after step 5; step 4 is on disk
    assert summary is None
    resumed, summary, rest = train(cfg, resume=True)
    assert summary["steps"] == 8 and len(rest) == 4  # steps 5..8 again
    for k, v in weights(whole.model).items():
        assert torch.equal(resumed.model.state_dict()[k], v), k
    assert first[:4] + rest == whole_losses
    steps = [json.loads(line)["step"] for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # step 5's line, logged before the crash, was dropped and redone


def test_ctrl_c_saves_and_resume_refuses_changed_settings(captions, tmp_path):
    cfg = settings(captions, tmp_path / "run")
    trainer, summary, _ = train(cfg, stop_at=3)
    assert summary is None
    assert load_state(tmp_path / "run")["step"] == 3
    with pytest.raises(PaliGemmaError, match="batch_size"):
        train({**cfg, "batch_size": 8}, resume=True)
    with pytest.raises(PaliGemmaError, match="objective"):
        train({**cfg, "objective": "clip"}, resume=True)
    with pytest.raises(PaliGemmaError, match="already holds a run"):
        train(cfg)
    with pytest.raises(PaliGemmaError, match="hard_negatives"):
        train({**cfg, "hard_negatives": 1}, resume=True)
    # A run saved before --hard-negatives existed has no such key: it used the default (0) and resumes.
    state_file = tmp_path / "run" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["config"]["hard_negatives"]
    state_file.write_text(json.dumps(state))
    assert train(cfg, resume=True)[1]["steps"] == 8


def test_clip_objective_lowers_the_loss_and_leaves_the_bias_alone(captions, tmp_path):
    trainer, summary, losses = train(settings(captions, tmp_path / "clip", objective="clip", steps=60))
    assert losses[0] == pytest.approx(torch.tensor(16.0).log().item(), abs=0.5)  # near log B at init
    assert mean(losses[-10:]) < mean(losses[:5]) - 0.4
    assert summary["bias"] == 0.0 and not trainer.model.logit_bias.requires_grad


def test_continue_from_a_checkpoint_brings_its_tokenizer(siglip_run, captions, tmp_path):
    base = siglip_run[0]
    out = tmp_path / "more"
    summary = run_contrastive_training(settings(captions, out, model=str(base), model_config=None, lr=None, steps=2))
    assert summary["lr"] < 1e-4  # the fine-tuning default learning rate (1e-5) during warmup
    assert (out / "tokenizer.model").read_bytes() == (base / "tokenizer.model").read_bytes()
    load_dual_encoder(out)


def test_hard_negatives_are_the_lines_own_wrong_captions_drawn_per_step(captions, tmp_path):
    trainer = ContrastiveTrainer(ContrastiveTrainConfig.from_dict(
        settings(captions, tmp_path / "neg", hard_negatives=2)))
    rows = list(range(16))
    wanted = sum(min(2, len(trainer.examples[i].negatives)) for i in rows)
    assert wanted > 16  # the fixture has two- and three-shape scenes
    draws = []
    for step in (0, 0, 1):
        _, ids = trainer.make_batch(rows, step)
        assert ids.shape[0] == 16 + wanted
        assert torch.equal(ids[:16], trainer.input_ids[rows])
        negatives = ids[16:].tolist()
        # In row order, each of an example's picks is one of its own negatives, never its caption.
        k = 0
        for i in rows:
            own = trainer.tokenizer(list(trainer.examples[i].negatives)).tolist()
            for _ in range(min(2, len(own))):
                assert negatives[k] in own and negatives[k] != trainer.input_ids[i].tolist()
                k += 1
        draws.append(negatives)
    assert draws[0] == draws[1]  # a pure function of (seed, step): resume sees the same batch
    assert draws[0] != draws[2]  # three-shape scenes have 5 negatives: another step draws others
    pixel_values, ids = trainer.make_batch(rows, 0)
    with torch.no_grad():  # the sigmoid loss only gains terms (16 x `wanted` more negatives), each positive
        assert contrastive_loss(trainer.model, pixel_values, ids, "siglip") > contrastive_loss(
            trainer.model, pixel_values, ids[:16], "siglip")


def test_hard_negatives_need_data_that_has_them(captions, tmp_path):
    bare = tmp_path / "bare.jsonl"
    lines = [json.loads(line) for line in captions.read_text().splitlines()]
    bare.write_text("".join(json.dumps({k: v for k, v in d.items() if k != "negatives"}) + "\n" for d in lines))
    for line in lines:
        (tmp_path / line["image"]).parent.mkdir(exist_ok=True)
        (tmp_path / line["image"]).write_bytes((captions.parent / line["image"]).read_bytes())
    with pytest.raises(PaliGemmaError, match="has none"):
        run_contrastive_training(settings(bare, tmp_path / "x", hard_negatives=1))
    run_contrastive_training(settings(bare, tmp_path / "y", steps=1))  # without the flag the file is fine


def test_chunked_siglip_loss_equals_the_whole_batch(siglip_run):
    trainer = siglip_run[1]
    batch = trainer.make_batch(list(range(10)))
    whole = contrastive_loss(trainer.model, *batch, "siglip")
    chunked = contrastive_loss(trainer.model, *batch, "siglip", chunk_size=3)
    torch.testing.assert_close(chunked, whole)


@pytest.mark.parametrize("change, message", [
    ({"objective": "infonce"}, "--objective"),
    ({"model": "somewhere"}, "exactly one of"),
    ({"trainable": "lora"}, "do not apply"),
    ({"batch_size": 1}, "--batch-size"),
    ({"lr": "fast"}, "lr must be float"),
    ({"hard_negatives": -1}, "--hard-negatives"),
])
def test_bad_settings_fail_before_training(captions, tmp_path, change, message):
    with pytest.raises(PaliGemmaError, match=message):
        run_contrastive_training(settings(captions, tmp_path / "x", **change))


def test_data_without_captions_or_images_fails_before_training(shapes, tmp_path):
    answers = tmp_path / "answers.jsonl"
    answers.write_text(json.dumps({"image": "a.png", "prefix": "answer en q", "suffix": "red", "task": "color"}) + "\n")
    with pytest.raises(PaliGemmaError, match="no caption lines"):
        run_contrastive_training(settings(answers, tmp_path / "x"))
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"image": "nope.png", "prefix": "caption en", "suffix": "a red circle"}) + "\n")
    with pytest.raises(PaliGemmaError, match="no usable example"):
        run_contrastive_training(settings(missing, tmp_path / "y"))
