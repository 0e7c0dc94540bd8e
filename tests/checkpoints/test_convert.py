"""`paligemma convert`: big_vision .npz -> folder, dtype recast, LoRA merge, and the failures in between.

The npz files are written from random models through the inverse mapping (`state_dict_to_npz`), in the
published layout: `params/` prefix, layers stacked, bfloat16 as 2-byte raw data.
"""

import errno
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from paligemma_cli.checkpoints.big_vision import expected_npz_shapes, infer_config, state_dict_to_npz
from paligemma_cli.checkpoints.hf import load_model, save_model
from paligemma_cli.cli import friendly_errors
from paligemma_cli.commands.convert import convert
from paligemma_cli.model.config import PaliGemmaConfig
from paligemma_cli.model.lora import apply_lora, lora_state_dict
from paligemma_cli.model.paligemma import PaliGemma
from paligemma_cli.processing.tokenizer import PaliGemmaTokenizer
from tests.fixtures.hf_reference import IMAGE_TOKEN, hf_position_ids, make_inputs, randomize_, tiny_hf_config
from tests.fixtures.tokenizer import make_tiny_tokenizer

GEMMA2_FLAGS = ["--attn-logit-softcap", "1.5", "--final-logit-softcap", "2.5", "--query-pre-attn-scalar", "20",
                "--sliding-window", "6"]


def _app():
    app = typer.Typer()
    app.callback()(lambda: None)  # keeps `convert` a subcommand rather than the whole app
    app.command("convert")(friendly_errors(convert))
    return app


def run_cli(*args):
    return CliRunner().invoke(_app(), ["convert", *map(str, args)])


def make_model(variant: str, dtype=torch.float32, seed: int = 0) -> PaliGemma:
    """A tiny random model (the parity tests' shapes) whose embedding stops at <image>, as the npz does."""
    torch.manual_seed(seed)
    model = PaliGemma(PaliGemmaConfig.from_dict(tiny_hf_config(variant).to_dict()))
    randomize_(model, seed)
    with torch.no_grad():
        model.language_model.embed_tokens.weight[IMAGE_TOKEN:] = 0
    return model.to(dtype).eval()


def write_npz(model, path, **changes):
    arrays = state_dict_to_npz(model)
    for key, value in changes.items():
        if value is None:
            del arrays[key]
        else:
            arrays[key] = value
    np.savez(path, **arrays)
    return path


def logits(model, batch):
    with torch.no_grad():
        return model(**batch)


@pytest.fixture(scope="module")
def batch():
    return make_inputs([4, 2], suffix_lengths=[2, 3], seed=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("variant", ["gemma", "gemma2"])
def test_npz_round_trip_gives_the_same_logits(variant, dtype, batch, tmp_path):
    model = make_model(variant, dtype)
    npz = write_npz(model, tmp_path / "pt.npz")
    if dtype == torch.bfloat16:  # stored as raw 2-byte data, like the PaliGemma 2 release
        assert np.load(npz)["params/llm/final_norm/scale"].dtype == np.dtype("V2")
    flags = GEMMA2_FLAGS if variant == "gemma2" else []
    result = run_cli(npz, tmp_path / "out", *flags)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(tmp_path / "out")
    if variant == "gemma2":  # the settings the decoder will run with are said, on stderr
        assert "attention soft-cap 1.5, final soft-cap 2.5, sliding window 6, query scale 20" in result.stderr
    converted = load_model(tmp_path / "out")
    assert converted.config.to_dict() == model.config.to_dict()
    assert converted.dtype == dtype
    assert torch.equal(logits(converted, batch), logits(model, batch))


@pytest.mark.parametrize("variant", ["gemma", "gemma2"])
def test_converted_folder_matches_transformers(variant, batch, tmp_path):
    from transformers import PaliGemmaForConditionalGeneration

    model = make_model(variant)
    npz = write_npz(model, tmp_path / "pt.npz")
    result = run_cli(npz, tmp_path / "out", *(GEMMA2_FLAGS if variant == "gemma2" else []))
    assert result.exit_code == 0, result.output
    hf = PaliGemmaForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        got = hf(**batch, position_ids=hf_position_ids(batch["attention_mask"])).logits
    real = batch["attention_mask"].bool()
    assert (got[real] - logits(model, batch)[real]).abs().max() < 1e-4


def test_published_shapes_give_the_published_config():
    # The real 3B npz: 257152 embedding rows; <image> is the next id and the table pads to 257216.

    for name in ("paligemma-3b-448", "paligemma2-3b-224", "paligemma2-28b-896"):
        published = PaliGemmaConfig.from_name(name)
        shapes = expected_npz_shapes(published)
        assert shapes["llm/embedder/input_embedding"][0] == 257152
        # The Hugging Face config, with its final soft-cap and sliding window asked for by flag.
        hf_settings = dict(final_logit_softcap=30.0, sliding_window=4096) if published.text.is_gemma2 else {}
        assert infer_config(shapes, **hf_settings).to_dict() == published.to_dict()


def test_gemma2_npz_runs_as_big_vision_by_default():
    # big_vision's Gemma 2 has no sliding window and PaliGemma's configs turn the final soft-cap off.
    cfg = infer_config(expected_npz_shapes(PaliGemmaConfig.from_name("paligemma2-3b-896")))
    t = cfg.text
    assert (t.sliding_window, t.final_logit_softcapping, t.attn_logit_softcapping) == (None, None, 50.0)
    assert all(t.layer_window(i) is None for i in range(t.num_hidden_layers))


def npz_for_tokenizer(tmp_path) -> tuple[Path, Path]:
    """An npz whose vocabulary ends where the tiny tokenizer's pieces end, and that tokenizer's file."""
    tok_file = make_tiny_tokenizer(tmp_path / "tok")
    pieces = PaliGemmaTokenizer.from_file(tok_file).image_token_id
    model = make_model("gemma")
    table = np.zeros((pieces, model.config.text.hidden_size), np.float32)
    return write_npz(model, tmp_path / "pt.npz", **{"params/llm/embedder/input_embedding": table}), tok_file


def test_tokenizer_is_copied_as_tokenizer_model(tmp_path):
    npz, tok_file = npz_for_tokenizer(tmp_path)
    shutil.copy(tok_file, tmp_path / "paligemma_tokenizer.model")
    result = run_cli(npz, tmp_path / "out", "--tokenizer", tmp_path / "paligemma_tokenizer.model")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == tok_file.read_bytes()
    assert PaliGemmaTokenizer.from_folder(tmp_path / "out").image_token_id == load_model(tmp_path / "out").config.image_token_id


def test_a_tokenizer_that_is_not_the_models_is_refused_and_nothing_is_written(tmp_path):
    npz, tok_file = npz_for_tokenizer(tmp_path)
    (tmp_path / "notes.txt").write_text("shopping list")
    result = run_cli(npz, tmp_path / "out", "--tokenizer", tmp_path / "notes.txt")
    assert result.exit_code == 1 and "not a SentencePiece model" in result.stderr, result.output
    other = write_npz(make_model("gemma"), tmp_path / "other.npz")  # 300 rows: <image> is 300
    result = run_cli(other, tmp_path / "out", "--tokenizer", tok_file)
    assert result.exit_code == 1 and "not this model's tokenizer" in result.stderr, result.output
    assert not (tmp_path / "out").exists()


def test_missing_array_is_named(tmp_path):
    npz = write_npz(make_model("gemma"), tmp_path / "pt.npz", **{"params/img/Transformer/encoder_norm/bias": None})
    result = run_cli(npz, tmp_path / "out")
    assert result.exit_code == 1
    assert "missing 'img/Transformer/encoder_norm/bias'" in result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_misshapen_array_is_named(tmp_path):
    key = "params/llm/layers/attn/attn_vec_einsum/w"
    npz = write_npz(make_model("gemma2"), tmp_path / "pt.npz", **{key: np.zeros((3, 4, 12, 41), np.float32)})
    result = run_cli(npz, tmp_path / "out", *GEMMA2_FLAGS)
    assert result.exit_code == 1
    assert "'llm/layers/attn/attn_vec_einsum/w' has shape (3, 4, 12, 41), expected (3, 4, 12, 40)" in result.stderr


def test_gemma2_options_refused_for_gemma1(tmp_path):
    npz = write_npz(make_model("gemma"), tmp_path / "pt.npz")
    result = run_cli(npz, tmp_path / "out", "--final-logit-softcap", "30")
    assert result.exit_code == 1 and "Gemma 2" in result.stderr


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.npz").write_text("not a zip file")
    (tmp_path / "empty").mkdir()
    truncated = write_npz(make_model("gemma"), tmp_path / "pt.npz")
    data = truncated.read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    flipped = bytearray(data)
    flipped[len(data) // 2: len(data) // 2 + 64] = bytes(64)  # inside a stored array: a CRC error on read
    (tmp_path / "flipped.npz").write_bytes(bytes(flipped))
    for src, message in [("notes.npz", "not a readable .npz"), ("empty", "no config.json"),
                         ("cut.npz", "not a readable .npz"), ("flipped.npz", "damaged"),
                         ("nowhere", "does not exist")]:
        result = run_cli(tmp_path / src, tmp_path / "out")
        assert result.exit_code == 1, src
        assert message in result.stderr, (src, result.stderr)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force(tmp_path, batch):
    model = make_model("gemma")
    npz = write_npz(model, tmp_path / "pt.npz")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    result = run_cli(npz, tmp_path / "out")
    assert result.exit_code == 1 and "--force" in result.stderr
    assert (tmp_path / "out" / "keep.txt").exists()
    # --force replaces only a folder this tool wrote: never one that holds a person's files.
    result = run_cli(npz, tmp_path / "out", "--force")
    assert result.exit_code == 1 and "did not write" in result.stderr
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    assert run_cli(npz, tmp_path / "ours").exit_code == 0
    other = write_npz(make_model("gemma", seed=1), tmp_path / "other.npz")
    result = run_cli(other, tmp_path / "ours", "--force")
    assert result.exit_code == 0, result.output
    assert torch.equal(logits(load_model(tmp_path / "ours"), batch), logits(make_model("gemma", seed=1), batch))


@pytest.mark.parametrize("where", ["parent", "same", "inside"])
def test_an_output_folder_around_or_inside_the_input_is_refused(tmp_path, where):
    src = tmp_path / "models" / "src"
    src.mkdir(parents=True)
    save_model(make_model("gemma"), src)
    (tmp_path / "models" / "notes.txt").write_text("unrelated")
    dst = {"parent": tmp_path / "models", "same": src, "inside": src / "sub"}[where]
    result = run_cli(src, dst, "--dtype", "bf16", "--force")
    assert result.exit_code == 1 and "input" in result.stderr, result.output
    assert load_model(src) is not None and (tmp_path / "models" / "notes.txt").read_text() == "unrelated"


def test_disk_full_leaves_no_folder(tmp_path, monkeypatch):
    from paligemma_cli.checkpoints import hf as checkpoint

    npz = write_npz(make_model("gemma"), tmp_path / "pt.npz")
    before = set(tmp_path.iterdir())

    def full_disk(state, folder, max_shard_bytes=None):
        (folder / "model.safetensors").write_bytes(b"half")  # a partial file, as a real failure leaves
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "write_safetensors", full_disk)
    result = run_cli(npz, tmp_path / "out")
    assert result.exit_code == 1
    assert "no space left" in result.stderr
    assert set(tmp_path.iterdir()) == before  # neither the folder nor a temporary sibling


def test_recast_to_bf16_sharded(tmp_path, batch):
    model = make_model("gemma2")
    save_model(model, tmp_path / "fp32")
    result = run_cli(tmp_path / "fp32", tmp_path / "bf16", "--dtype", "bf16", "--max-shard-size", "20KB")
    assert result.exit_code == 0, result.output
    index = json.loads((tmp_path / "bf16" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    for shard in shards:
        with safe_open(str(tmp_path / "bf16" / shard), framework="pt") as f:
            assert all(f.get_slice(k).get_dtype() == "BF16" for k in f.keys())
    recast = load_model(tmp_path / "bf16")
    assert recast.dtype == torch.bfloat16
    # Exactly the fp32 model cast in memory, and close to the fp32 logits.
    assert torch.equal(logits(recast, batch), logits(model.to(torch.bfloat16), batch))
    fp32 = logits(model.float(), batch)
    assert (logits(recast, batch).float() - fp32).abs().max() < 0.1 * fp32.abs().max()


def test_merge_lora(tmp_path, batch):
    model = make_model("gemma")
    save_model(model, tmp_path / "base")
    apply_lora(model, r=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.2)
    adapted = logits(model, batch)
    run = tmp_path / "run"
    run.mkdir()
    save_file(lora_state_dict(model), str(run / "adapter_model.safetensors"))
    shutil.copy(tmp_path / "base" / "config.json", run / "config.json")
    config = {"base_model": str(tmp_path / "moved-away"), "r": 4, "alpha": 8,
              "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
    (run / "adapter_config.json").write_text(json.dumps(config))

    result = run_cli(run, tmp_path / "merged")
    assert result.exit_code == 1 and "--merge-lora" in result.stderr
    result = run_cli(run, tmp_path / "merged", "--merge-lora")
    assert result.exit_code == 1 and "--base" in result.stderr
    result = run_cli(run, tmp_path / "merged", "--merge-lora", "--base", tmp_path / "base")
    assert result.exit_code == 0, result.output
    shutil.rmtree(tmp_path / "merged")

    config["base_model"] = str(tmp_path / "base")
    (run / "adapter_config.json").write_text(json.dumps(config))
    result = run_cli(run, tmp_path / "merged", "--merge-lora")
    assert result.exit_code == 0, result.output
    merged = load_model(tmp_path / "merged")
    assert not any("lora" in k for k in merged.state_dict())
    torch.testing.assert_close(logits(merged, batch), adapted, rtol=1e-5, atol=1e-5)


def test_a_vae_beside_the_model_travels_with_it(tmp_path):
    from tests.fixtures.checkpoints import make_tiny_checkpoint

    src = make_tiny_checkpoint(tmp_path / "src")
    (src / "vae-oid.npz").write_bytes(b"the model's VQ-VAE")
    result = run_cli(str(src), str(tmp_path / "bf16"), "--dtype", "bf16")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "bf16" / "vae-oid.npz").read_bytes() == b"the model's VQ-VAE"
