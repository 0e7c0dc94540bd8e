"""`paligemma classify`: per-label probabilities equal sigmoid(logits) worked out from the DualEncoder's
embeddings, ranked output on stdout, and one-line errors.

The command is mounted on a test app exactly as `cli.register_plugins` mounts an entry point, so the
tests do not depend on the package's installed entry points.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import typer
from PIL import Image
from typer.testing import CliRunner

from paligemma_cli.checkpoints.hf import load_dual_encoder, save_dual_encoder
from paligemma_cli.cli import friendly_errors
from paligemma_cli.commands.classify import classify
from paligemma_cli.model.config import SiglipConfig
from paligemma_cli.model.siglip import DualEncoder
from paligemma_cli.processing.image import load_image, preprocess
from paligemma_cli.processing.siglip_tokenizer import SiglipTokenizer
from paligemma_cli.training.tokenizer_training import train_siglip_tokenizer
from tests.fixtures.checkpoints import make_tiny_checkpoint
from tests.fixtures.cli import one_line_error

app = typer.Typer()
app.command("classify")(friendly_errors(classify))
app.command("unused")(lambda: None)  # two commands, so `classify` stays a subcommand as in the real CLI
runner = CliRunner()

LABELS = ["a red circle", "a blue square", "an orange triangle"]


def run(*args):
    return runner.invoke(app, ["classify", *map(str, args)])




@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A random `siglip-tiny-32` with a trained tokenizer; temperature and bias moved off SigLIP's init so
    the probabilities spread over (0, 1) instead of sitting near sigmoid(-10)."""
    folder = tmp_path_factory.mktemp("siglip") / "model"
    tok_file = train_siglip_tokenizer(LABELS + ["a green circle", "a purple square"], folder.parent / "tokenizer.model")
    tok = SiglipTokenizer.from_file(tok_file)
    torch.manual_seed(0)
    model = DualEncoder(SiglipConfig.from_name("siglip-tiny-32", text__vocab_size=tok.vocab_size))
    with torch.no_grad():
        model.logit_scale.fill_(math.log(4.0))
        model.logit_bias.fill_(-0.3)
    save_dual_encoder(model, folder)
    (folder / "tokenizer.model").write_bytes(tok_file.read_bytes())  # after: save_dual_encoder replaces the folder
    return folder


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "scene.png"
    img = Image.new("RGB", (40, 30), "white")
    img.paste((220, 30, 30), (5, 5, 20, 20))
    img.save(path)
    return path


def by_hand(folder: Path, image: Path, labels: list[str]) -> dict[str, float]:
    """sigmoid(cos(image, label) * exp(logit_scale) + logit_bias) from the model's own embeddings."""
    model = load_dual_encoder(folder)
    tok = SiglipTokenizer.from_folder(folder, model.config.text)
    with torch.no_grad():
        img = F.normalize(model.encode_image(preprocess([load_image(image)], 32)), dim=-1)  # (1, D)
        txt = F.normalize(model.encode_text(tok(labels)), dim=-1)  # (L, D)
        logits = img @ txt.T * model.logit_scale.exp() + model.logit_bias
    return dict(zip(labels, torch.sigmoid(logits)[0].tolist()))


def test_json_probabilities_are_sigmoid_of_the_logits_most_likely_first(ckpt, image):
    result = run(image, ",".join(LABELS), "--model", ckpt, "--json", "--device", "cpu", "--dtype", "fp32")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    got = {item["label"]: item["probability"] for item in out["labels"]}
    expected = by_hand(ckpt, image, LABELS)
    assert got.keys() == expected.keys()
    for label in LABELS:
        assert 0 < got[label] < 1
        assert got[label] == pytest.approx(expected[label], abs=1e-5)
    probs = [item["probability"] for item in out["labels"]]
    assert probs == sorted(probs, reverse=True)
    assert len(set(probs)) > 1  # the labels are told apart, not all equal
    assert out["image"] == str(image) and Path(out["model"]) == ckpt.resolve()


def test_text_output_is_one_line_per_label_on_stdout(ckpt, image):
    # Spaces around the commas are ignored.
    result = run(image, " a red circle , a blue square", "-m", ckpt, "--device", "cpu", "--dtype", "fp32")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    expected = by_hand(ckpt, image, LABELS[:2])
    ranked = sorted(expected, key=lambda k: -expected[k])
    assert lines == [f"{expected[label]:.4f}\t{label}" for label in ranked]
    assert result.stderr == ""  # not a terminal: no loading spinner


def test_bad_input_gives_one_line(ckpt, image, tmp_path):
    one_line_error(run(image, "a,b"), "--model")
    one_line_error(run(image, "a red circle,,a blue square", "-m", ckpt), "empty label")
    one_line_error(run(image, " , ", "-m", ckpt), "no labels")
    one_line_error(run(image, "a,a", "-m", ckpt), "twice")
    one_line_error(run(tmp_path / "nope.png", "a,b", "-m", ckpt), "nope.png")
    one_line_error(run(image, "a,b", "-m", tmp_path / "missing"), "missing")
    paligemma = make_tiny_checkpoint(tmp_path / "paligemma")
    one_line_error(run(image, "a,b", "-m", paligemma), "not a SigLIP dual encoder")
    no_tok = tmp_path / "no-tokenizer"
    save_dual_encoder(load_dual_encoder(ckpt), no_tok)
    one_line_error(run(image, "a,b", "-m", no_tok), "no tokenizer")
    one_line_error(run(image, "a,b", "-m", ckpt, "--device", "tpu"), "--device")


def test_tokenizer_matches_transformers_siglip_tokenizer(tmp_path):
    """Lowercased, punctuation dropped, `</s>` kept when truncating, padded with `</s>` to the length."""
    from transformers import SiglipTokenizer as HFSiglipTokenizer

    spiece = train_siglip_tokenizer(LABELS + ["a purple square and two cats"], tmp_path / "spiece.model")
    texts = ["A Red circle.", "  a blue,   square!! and  TWO cats",
             "an orange triangle and a red circle and a blue square and a purple square"]  # longer than 16
    ref = HFSiglipTokenizer(vocab_file=str(spiece))(texts, padding="max_length", max_length=16, truncation=True,
                                                    return_tensors="pt").input_ids
    assert torch.equal(SiglipTokenizer.from_file(spiece, max_length=16)(texts), ref)


def test_a_siglip_saved_by_transformers_with_its_default_eos_id_classifies(tmp_path, image):
    """transformers writes `eos_token_id: 49407` (its CLIP-sized default) into a SigLIP config.json and never
    uses it; the tokenizer's own `</s>` is the one that ends and pads a text."""
    from transformers import SiglipConfig as HFSiglipConfig
    from transformers import SiglipModel

    tok_file = train_siglip_tokenizer(LABELS + ["a green circle"], tmp_path / "tokenizer.model")
    vocab = SiglipTokenizer.from_file(tok_file).vocab_size
    cfg = HFSiglipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         vocab_size=vocab, max_position_embeddings=16),
    )
    torch.manual_seed(0)
    folder = tmp_path / "hf"
    SiglipModel(cfg).save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["text_config"]["eos_token_id"] >= vocab
    (folder / "tokenizer.model").write_bytes(tok_file.read_bytes())
    result = run(image, ",".join(LABELS), "--model", folder, "--json")
    assert result.exit_code == 0, result.output
    probabilities = [entry["probability"] for entry in json.loads(result.stdout)["labels"]]
    assert len(probabilities) == len(LABELS) and all(0 < p < 1 for p in probabilities)


def test_a_decompression_bomb_is_one_line(ckpt, tmp_path):
    from tests.fixtures.bad_inputs import png_bomb

    one_line_error(run(png_bomb(tmp_path / "bomb.png"), ",".join(LABELS), "--model", ckpt), "too large")
