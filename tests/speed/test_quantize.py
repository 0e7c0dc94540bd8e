"""Weight-only int8: the arithmetic, the module swap, generation, and int8 folders through the CLI."""

import json
import shutil

import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from paligemma_cli.checkpoints.hf import load_model, weight_files
from paligemma_cli.cli import app
from paligemma_cli.errors import PaliGemmaError
from paligemma_cli.inference.generate import SamplingOptions
from paligemma_cli.inference.pipeline import Pipeline
from paligemma_cli.speed.quantize import (
    INT8_DEQUANTIZE_FROM_ROWS,
    QuantizedEmbedding,
    QuantizedLinear,
    int8_linear,
    is_quantized,
    quantize_model,
    quantize_per_channel,
)
from tests.fixtures.checkpoints import make_tiny_checkpoint, write_images

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("img"), 10)


def _batch(model, seed=0, pads=(0, 3, 1), length=12):
    """A left-padded batch for the tiny checkpoint: each row image tokens, then text, after `pad` pads."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    n = cfg.num_image_tokens
    ids = torch.randint(5, cfg.image_token_id, (len(pads), n + length), generator=g)
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        ids[row, :pad], mask[row, :pad] = 0, 0
        ids[row, pad:pad + n] = cfg.image_token_id
    types = torch.zeros_like(ids)
    types[:, -4:] = 1  # a causal suffix
    pixels = torch.randn(len(pads), 3, cfg.image_size, cfg.image_size, generator=g)
    return {"input_ids": ids, "pixel_values": pixels, "token_type_ids": types, "attention_mask": mask}


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch)


def _relative_error(got, expected, batch) -> float:
    """RMS relative error of the logits over the real (unpadded) positions."""
    real = batch["attention_mask"].bool()
    return float((got[real].float() - expected[real]).norm() / expected[real].norm())


# --- the arithmetic -----------------------------------------------------------------------------------------


def test_scales_and_values_by_hand():
    w = torch.tensor([
        [254.0, -100.0, 7.2, 0.4],   # max 254 -> scale 2:   127, -50, 3.6 -> 4, 0.2 -> 0
        [0.0, 0.0, 0.0, 0.0],        # all zero: q = 0 (the scale is then 1, any would do)
        [-12.7, 6.3, 0.04, 1.0],     # max |-12.7| -> scale 0.1: -127, 63, 0, 10
        [1.27, -0.5, 0.26, -1.27],   # scale 0.01: 127, -50, 26, -127
    ])
    q, s = quantize_per_channel(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    torch.testing.assert_close(s, torch.tensor([2.0, 1.0, 0.1, 0.01]))
    assert q.tolist() == [[127, -50, 4, 0], [0, 0, 0, 0], [-127, 63, 0, 10], [127, -50, 26, -127]]
    # Every element within half a step of its row.
    assert ((q.float() * s[:, None] - w).abs() <= s[:, None] / 2 + 1e-6).all()


def test_scales_are_rounded_to_their_dtype_before_q_is_made():
    w = torch.randn(64, 48) * torch.logspace(-3, 1, 64)[:, None]
    q, s = quantize_per_channel(w, torch.bfloat16)
    assert s.dtype == torch.bfloat16
    # Half a step of the *stored* scale, up to the one-part-in-256 the bf16 scale may sit below max/127.
    err = (q.float() * s.float()[:, None] - w).abs()
    assert (err <= s.float()[:, None] * (0.5 + 2**-7)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_linear_is_within_the_int8_error_bound(dtype):
    torch.manual_seed(0)
    linear = nn.Linear(96, 40, bias=False)
    with torch.no_grad():
        linear.weight.mul_(torch.logspace(-2, 1, 40)[:, None])  # channels of very different size
    x = torch.randn(2, 5, 96)
    exact = linear(x)  # float32 reference
    qlinear = QuantizedLinear.from_float(linear.to(dtype))
    got = qlinear(x.to(dtype)).float()
    assert got.shape == (2, 5, 40)
    # |y_n - y'_n| = |sum_k x_k (w_nk - q_nk s_n)| <= (s_n / 2) * sum_k |x_k| for output channel n,
    # plus what the activation dtype rounds away (float32: nothing to speak of; bf16: 2^-8 relative).
    bound = qlinear.scales.float() / 2 * x.to(dtype).float().abs().sum(-1, keepdim=True)
    slack = 1e-5 if dtype == torch.float32 else 2**-7 * (exact.abs() + bound) + 1e-2 * bound
    if dtype == torch.bfloat16:
        exact = nn.functional.linear(x.to(dtype).float(), linear.weight.float())  # same inputs, rounded
    assert ((got - exact).abs() <= bound + slack).all()
    # Relative to each channel's size, the error is small whatever that size.
    rel = (got - exact).norm(dim=(0, 1)) / exact.norm(dim=(0, 1))
    assert rel.max() < 0.02


def test_cpu_bf16_uses_the_int8pack_kernel_and_agrees_with_the_fallback():
    torch.manual_seed(1)
    w = torch.randn(72, 64)
    q, s = quantize_per_channel(w, torch.bfloat16)
    x = torch.randn(3, 4, 64, dtype=torch.bfloat16)
    got = int8_linear(x, q, s)
    kernel = torch.ops.aten._weight_int8pack_mm(x.reshape(12, 64), q, s).view(3, 4, 72)
    assert torch.equal(got, kernel)
    fallback = int8_linear(x.float(), q, s.float())  # float32 takes the dequantizing path
    assert (got.float() - fallback).abs().max() <= 2**-7 * fallback.abs().max()


def test_a_bf16_prefill_of_many_rows_takes_the_bf16_matmul_and_agrees_with_the_kernel():
    torch.manual_seed(3)
    q, s = quantize_per_channel(torch.randn(72, 64), torch.bfloat16)
    few = torch.randn(1, INT8_DEQUANTIZE_FROM_ROWS - 1, 64, dtype=torch.bfloat16)
    many = torch.randn(2, INT8_DEQUANTIZE_FROM_ROWS, 64, dtype=torch.bfloat16)
    kernel = torch.ops.aten._weight_int8pack_mm
    assert torch.equal(int8_linear(few, q, s), kernel(few[0], q, s)[None])
    got = int8_linear(many, q, s)
    assert torch.equal(got, nn.functional.linear(many, q.to(torch.bfloat16)) * s)  # not the kernel
    by_kernel = kernel(many.reshape(-1, 64), q, s).view(2, -1, 72).float()
    assert (got.float() - by_kernel).abs().max() <= 2**-6 * by_kernel.abs().max()  # a rounding or two apart


@pytest.mark.parametrize("case", ["k_not_multiple_of_16", "weight_misaligned", "input_misaligned", "input_strided"])
def test_shapes_and_layouts_the_int8pack_kernel_cannot_take_still_work(case):
    """The bf16 CPU kernel crashes or drops part of K on these (torch 2.13); int8_linear must not."""
    torch.manual_seed(2)
    k = 40 if case == "k_not_multiple_of_16" else 64
    q, s = quantize_per_channel(torch.randn(48, k), torch.bfloat16)
    x = torch.randn(6, k, dtype=torch.bfloat16)
    if case == "weight_misaligned":
        q = torch.cat([torch.zeros(8, dtype=torch.int8), q.flatten()])[8:].view(48, k)
        assert q.data_ptr() % 16
    if case == "input_misaligned":
        x = torch.cat([torch.zeros(8, dtype=torch.bfloat16), x.flatten()])[8:].view(6, k)
        assert x.data_ptr() % 32 and x.is_contiguous()
    if case == "input_strided":
        x = torch.randn(k, 6, dtype=torch.bfloat16).T
    expected = x.float() @ (q.float() * s.float()[:, None]).T
    got = int8_linear(x, q, s).float()
    assert (got - expected).abs().max() <= 2**-7 * expected.abs().max()


# --- the module swap ----------------------------------------------------------------------------------------


def test_quantize_model_swaps_the_decoder_and_nothing_else(ckpt):
    model = load_model(ckpt)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n_layers = model.config.text.num_hidden_layers
    quantize_model(model)
    assert is_quantized(model) and model.dtype == torch.float32 and model.device.type == "cpu"
    decoder = model.language_model
    assert not [n for n, m in decoder.named_modules() if isinstance(m, nn.Linear)]
    assert sum(isinstance(m, QuantizedLinear) for m in decoder.modules()) == 7 * n_layers
    assert isinstance(decoder.embed_tokens, QuantizedEmbedding)
    assert all(m.weight.dtype == torch.int8 for m in decoder.modules() if isinstance(m, QuantizedLinear))
    after = model.state_dict()
    untouched = [k for k in before if not k.startswith("language_model.") or "norm" in k]
    assert any(k.startswith("vision_tower.") for k in untouched)
    assert any(k.startswith("multi_modal_projector.") for k in untouched)
    assert any("layernorm" in k for k in untouched) and "language_model.norm.weight" in untouched
    for k in untouched:
        assert torch.equal(after[k], before[k]) and after[k].dtype == before[k].dtype, k
    assert isinstance(model.multi_modal_projector.linear, nn.Linear)
    assert quantize_model(model) is model  # a second call changes nothing


def test_quantizing_while_loading_equals_quantizing_after(ckpt):
    model = load_model(ckpt)
    batch = _batch(model)
    float_logits = _logits(model, batch)
    after = _logits(quantize_model(model), batch)
    at_load = _logits(load_model(ckpt, quantize="int8"), batch)
    assert torch.equal(at_load, after)
    # The same order of error as running the float model in bf16 (2.4% here); measured 3.2%.
    assert _relative_error(after, float_logits, batch) < 0.06


def test_bf16_logits_stay_close(ckpt):
    reference = load_model(ckpt)
    batch = _batch(reference, seed=3)
    int8 = _logits(load_model(ckpt, dtype=torch.bfloat16, quantize="int8"), batch)
    bf16 = _logits(load_model(ckpt, dtype=torch.bfloat16), batch)
    expected = _logits(reference, batch)
    # bf16 alone is ~2.4% off float32 here; bf16 + int8 weights may be off by up to about twice that.
    assert _relative_error(int8, expected, batch) < 2.5 * _relative_error(bf16, expected, batch)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_greedy_generation_mostly_agrees_with_the_float_model(tmp_path, dtype):
    """On the shipped demo model (trained, ~5M parameters) and 10 fresh shapes questions.

    A trained model is used because a random one has near-ties everywhere: on the tiny random checkpoint
    the top token agrees at 91% of positions, so whole 8-token answers agree on only ~40% of prompts,
    about as often as bf16 agrees with fp32 there.
    """
    from paligemma_cli.data.jsonl import read_jsonl
    from paligemma_cli.data.shapes import write_dataset
    from paligemma_cli.settings import resolve_model

    examples = read_jsonl(write_dataset(tmp_path, n=10, seed=2024))
    pictures, prompts = [Image.open(e.image) for e in examples], [e.prefix for e in examples]
    opts = SamplingOptions(max_new_tokens=16)
    demo = resolve_model(None)
    float_answers = Pipeline.load(demo, "cpu", dtype).generate(pictures, prompts, opts)
    int8_answers = Pipeline.load(demo, "cpu", dtype, quantize="int8").generate(pictures, prompts, opts)
    rate = sum(a == b for a, b in zip(float_answers, int8_answers)) / len(prompts)
    print(f"\nint8 greedy answers equal to {dtype}: {rate:.0%} of {len(prompts)} prompts")
    assert rate >= 0.8


def test_bad_quantize_values():
    from paligemma_cli.speed.quantize import parse_quantize

    assert parse_quantize("INT8") == "int8" and parse_quantize("none") is None and parse_quantize(None) is None
    with pytest.raises(PaliGemmaError, match="use none or int8"):
        parse_quantize("int4")
    with pytest.raises(PaliGemmaError, match="2-D float weight"):
        quantize_per_channel(torch.zeros(2, 2, dtype=torch.int8))


# --- int8 folders -----------------------------------------------------------------------------------------


def _size(folder):
    return sum(f.stat().st_size for f in weight_files(folder))


def _tensors(folder) -> dict:
    from safetensors.torch import load_file

    return {k: v for file in weight_files(folder) for k, v in load_file(file).items()}


@pytest.mark.parametrize("dtype", [None, "bf16"])
def test_convert_quantize_round_trip(ckpt, tmp_path, dtype):
    dst = tmp_path / "int8"
    args = ["convert", ckpt, dst, "--quantize", "int8"] + (["--dtype", dtype] if dtype else [])
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(dst)
    marker = json.loads((dst / "config.json").read_text())["quantization"]
    assert marker["method"] == "int8-weight-only"
    assert (dst / "tokenizer.model").exists()
    # Each decoder weight shrinks to 1 byte (from 4 in float32) plus one scale per row; the rest stays
    # float32, or halves with --dtype bf16.
    elsize = 2 if dtype else 4
    decoder = rest = 0
    for key, t in _tensors(ckpt).items():
        if key.startswith("language_model.") and key.endswith(("_proj.weight", "embed_tokens.weight")):
            decoder += t.numel() + t.shape[0] * elsize
        else:
            rest += t.numel() * elsize
    assert decoder + rest < _size(dst) < decoder + rest + 40_000  # + the safetensors header
    assert _size(dst) < 0.6 * _size(ckpt)
    torch_dtype = torch.bfloat16 if dtype else None
    loaded = load_model(dst)
    assert is_quantized(loaded) and loaded.dtype == (torch_dtype or torch.float32)
    batch = _batch(loaded, seed=7)
    # Exactly what quantizing at load time gives.
    assert torch.equal(_logits(loaded, batch), _logits(load_model(ckpt, dtype=torch_dtype, quantize="int8"), batch))
    # Saving again (a recast of an int8 folder) keeps it int8 and the same.
    again = run("convert", dst, tmp_path / "again")
    assert again.exit_code == 0, again.output
    assert torch.equal(_logits(load_model(tmp_path / "again"), batch), _logits(loaded, batch))


def test_npz_converts_straight_to_int8(tmp_path):
    from tests.checkpoints.test_convert import make_model, write_npz

    npz = write_npz(make_model("gemma2"), tmp_path / "pt.npz")
    assert run("convert", npz, tmp_path / "float").exit_code == 0
    result = run("convert", npz, tmp_path / "int8", "--quantize", "int8")
    assert result.exit_code == 0, result.output
    loaded = load_model(tmp_path / "int8")
    assert is_quantized(loaded)
    batch = _batch(loaded, seed=4, pads=(0, 2))
    assert torch.equal(_logits(loaded, batch), _logits(load_model(tmp_path / "float", quantize="int8"), batch))


def test_int8_folder_without_its_marker_is_explained(ckpt, tmp_path):
    dst = tmp_path / "int8"
    assert run("convert", ckpt, dst, "--quantize", "int8").exit_code == 0
    cfg = json.loads((dst / "config.json").read_text())
    del cfg["quantization"]
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PaliGemmaError, match=r"is int8.*no \"quantization\" entry"):
        load_model(dst)
    cfg["quantization"] = {"method": "gptq-4bit"}
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PaliGemmaError, match="cannot load"):
        load_model(dst)


def test_commands_run_an_int8_folder_and_quantize_at_load(ckpt, images, tmp_path):
    dst = tmp_path / "int8"
    assert run("convert", ckpt, dst, "--quantize", "int8").exit_code == 0
    shutil.copy(images[0], tmp_path / "a.png")
    expected = Pipeline.load(ckpt, "cpu", "fp32", quantize="int8").generate(
        [Image.open(images[0])], ["answer en what is it?"], SamplingOptions(max_new_tokens=6))[0]
    saved = run("ask", images[0], "what is it?", "--model", dst, "--max-tokens", 6, "--dtype", "fp32")
    at_load = run("ask", images[0], "what is it?", "--model", ckpt, "--max-tokens", 6, "--dtype", "fp32",
                  "--quantize", "int8")
    assert saved.exit_code == 0 and at_load.exit_code == 0, saved.output + at_load.output
    assert saved.stdout == at_load.stdout == expected + "\n"

    result = run("caption", tmp_path / "a.png", "--model", dst, "--max-tokens", 4, "--quantize", "int8")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.splitlines()[0])["image"].endswith("a.png")
    result = run("detect", images[0], "cat", "--model", dst, "--max-tokens", 4, "--json")
    assert result.exit_code == 0, result.output
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"image": str(p), "prefix": "caption en", "suffix": "a picture"}) + "\n"
                            for p in images[:2]))
    result = run("eval", data, "--model", ckpt, "--quantize", "int8", "--max-tokens", 4, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["n"] == 2

    # chat answers from a cached image encoding (a different summation order than ask), so it is compared
    # with itself: quantizing at load must give what the int8 folder gives, and not what float gives.
    chats = [runner.invoke(app, ["chat", str(images[0]), "--model", str(m), "--dtype", "fp32", "--max-tokens", "6",
                                 *extra], input="what is it?\nwhat color?\n")
             for m, extra in ((ckpt, ["--quantize", "int8"]), (dst, []), (ckpt, []))]
    assert all(c.exit_code == 0 for c in chats), chats[0].output
    assert chats[0].stdout == chats[1].stdout != chats[2].stdout

    # int8 weights cannot be trained: refused with one line, before any step.
    result = run("train", data, "--model", dst, "--out", tmp_path / "run", "--steps", 1)
    assert result.exit_code == 1 and "cannot be trained" in result.output, result.output
    assert not (tmp_path / "run" / "step-1").exists()


@pytest.mark.parametrize("command", ["ask", "convert"])
def test_bad_quantize_value_is_one_line(ckpt, images, tmp_path, command):
    if command == "ask":
        result = run("ask", images[0], "q?", "--model", ckpt, "--quantize", "int4")
    else:
        result = run("convert", ckpt, tmp_path / "out", "--quantize", "int4")
    assert result.exit_code == 1
    assert result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["error: unknown --quantize 'int4': use none or int8"], result.stderr
    assert not (tmp_path / "out").exists()
