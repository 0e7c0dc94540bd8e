"""The kernel each CPU class gets, and each int8 path against the float32 model it stands for."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from paligemma_cli.cli import app
from paligemma_cli.errors import PaliGemmaError
from paligemma_cli.speed import kernel_choice
from paligemma_cli.speed.dynamic_int8 import DynamicInt8Head, DynamicInt8Linear, available, use_dynamic_int8
from paligemma_cli.speed.kernel_choice import CpuFacts, int8_kernel
from paligemma_cli.speed.quantize import int8_linear, quantize_model, quantize_per_channel
from tests.speed.test_compiled_decode import IMAGE_TOKEN, tiny

ROOT = Path(__file__).resolve().parents[2]
# Largest logit error against float32 (logits up to ~9). Measured: weight-only 0.20; dynamic 0.25 with
# VNNI, 0.43 held to AVX2, where fbgemm quantizes activations to 7 bits to keep its 16-bit sums in range.
TOLERANCE = {"weight-only": 0.3, "dynamic": 0.6}
CLASSES = {
    "AVX2": CpuFacts(capability="AVX2", native_bf16=False, vnni=False, fbgemm=True),
    "AVX-512 without bf16": CpuFacts(capability="AVX512", native_bf16=False, vnni=True, fbgemm=True),
    "AVX-512 with bf16": CpuFacts(capability="AVX512", native_bf16=True, vnni=True, fbgemm=True),
    "no fbgemm": CpuFacts(capability="AVX2", native_bf16=False, vnni=False, fbgemm=False),
}


@pytest.mark.parametrize("cpu", CLASSES)
def test_the_automatic_int8_kernel_per_cpu_class(cpu, monkeypatch):
    monkeypatch.setattr(kernel_choice, "cpu_facts", lambda: CLASSES[cpu])
    monkeypatch.delenv(kernel_choice.INT8_KERNEL_ENV, raising=False)
    cpu_device = torch.device("cpu")
    assert CLASSES[cpu].cpu_class == {"AVX2": "AVX2", "no fbgemm": "AVX2"}.get(cpu, cpu)
    # Weight-only int8 on every class and dtype: it keeps the activations (bf16, or float32 rounded to bf16
    # for the kernel); dynamic int8 cost accuracy and is only chosen on request.
    for dtype in (torch.bfloat16, torch.float32):
        assert int8_kernel(dtype, cpu_device) == "weight-only"
    assert int8_kernel(torch.float32, torch.device("cuda")) == "weight-only"
    text = kernel_choice.describe(torch.float32, cpu_device, quantized=True, fast_layout=True)["decoder linears"]
    assert "bf16 activations" in text and "float32 rounded to bf16" in text


def test_the_choice_can_be_forced_and_refuses_what_cannot_run(monkeypatch):
    monkeypatch.setattr(kernel_choice, "cpu_facts", lambda: CLASSES["AVX2"])
    monkeypatch.setenv(kernel_choice.INT8_KERNEL_ENV, "weight-only")
    assert int8_kernel(torch.float32, torch.device("cpu")) == "weight-only"
    monkeypatch.setenv(kernel_choice.INT8_KERNEL_ENV, "dynamic")
    assert int8_kernel(torch.float32, torch.device("cpu")) == "dynamic"
    monkeypatch.setattr(kernel_choice, "cpu_facts", lambda: CLASSES["no fbgemm"])
    with pytest.raises(PaliGemmaError, match="needs float32 on a CPU with fbgemm"):
        int8_kernel(torch.float32, torch.device("cpu"))
    monkeypatch.setattr(kernel_choice, "cpu_facts", lambda: CLASSES["AVX2"])
    with pytest.raises(PaliGemmaError, match="needs float32"):
        int8_kernel(torch.bfloat16, torch.device("cpu"))
    monkeypatch.setenv(kernel_choice.INT8_KERNEL_ENV, "fastest")
    with pytest.raises(PaliGemmaError, match="must be one of"):
        int8_kernel(torch.float32, torch.device("cpu"))


def test_float32_activations_take_the_int8_kernel_through_bf16_and_stay_close():
    torch.manual_seed(0)
    w = torch.randn(96, 64) * 0.05
    q, scales = quantize_per_channel(w)
    exact = None
    for rows in (1, 5, 70):  # decode, a question, a prompt (70 rows: dequantized float32 matmul)
        x = torch.randn(rows, 64)
        exact = x @ (q.float() * scales[:, None]).T
        got = int8_linear(x, q, scales)
        assert got.dtype == torch.float32 and got.shape == exact.shape
        # bf16 activations (8 significant bits) in, a bf16 sum out: about 2**-8 of the output's size.
        assert (got - exact).abs().max() <= 2**-7 * exact.abs().max()
        if rows >= 64:
            torch.testing.assert_close(got, exact)  # the float32 path is exact up to float32 rounding


def reference_and_int8_logits(kernel: str):
    """Logits of a tiny float32 model and of its int8 version with `kernel`, on a prompt and 4 decode steps."""
    model = tiny("gemma2")
    ids = torch.cat([torch.full((1, 4), IMAGE_TOKEN), torch.randint(3, 200, (1, 6))], 1)
    pixels = torch.randn(1, 3, 16, 16)
    quantized = quantize_model(tiny("gemma2"))
    if kernel == "dynamic":
        use_dynamic_int8(quantized)
        assert any(isinstance(m, DynamicInt8Linear) for m in quantized.modules())
        assert isinstance(quantized.language_model.embed_tokens, DynamicInt8Head)
    out = []
    for m in (model, quantized):
        cache = m.new_cache(1, 20)
        with torch.inference_mode():
            logits = [m.extend(cache, ids, pixels)]
            for step in range(4):
                logits.append(m.extend(cache, torch.tensor([[5 + step]])))
        out.append(torch.stack(logits))
    return out


@pytest.mark.parametrize("kernel", ["weight-only", "dynamic"])
def test_each_int8_kernel_stays_near_the_float32_model(kernel):
    if kernel == "dynamic" and not available():
        pytest.skip("no fbgemm in this torch")
    reference, got = reference_and_int8_logits(kernel)
    tolerance = TOLERANCE[kernel]
    assert (got - reference).abs().max() < tolerance, (got - reference).abs().max()
    assert (got.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.8


def test_the_avx2_paths_agree_with_the_native_ones():
    """With torch's, oneDNN's, MKL's and fbgemm's kernels held to AVX2 (as on an AVX2-only CPU), each int8 path
    gives what it gives natively, to its own rounding."""
    script = (
        "import json, torch, sys; sys.path.insert(0, '.')\n"
        "from tests.speed.test_kernel_choice import reference_and_int8_logits\n"
        "torch.manual_seed(0)\n"
        "out = {k: [t.tolist() for t in reference_and_int8_logits(k)] for k in ('weight-only', 'dynamic')}\n"
        "print(json.dumps(out))\n")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
           "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}
    avx2 = json.loads(subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True,
                                     text=True, check=True).stdout)
    for kernel, (reference, got) in avx2.items():
        reference, got = torch.tensor(reference), torch.tensor(got)
        assert (got - reference).abs().max() < TOLERANCE[kernel], kernel


def test_env_reports_the_cpu_class_and_kernels():
    result = CliRunner().invoke(app, ["env", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    facts = kernel_choice.cpu_facts()
    assert report["cpu_class"] == facts.cpu_class and report["torch_cpu_capability"] == facts.capability
    assert set(report["kernels"]) == set(report["kernels_int8"]) == {"decoder linears", "output head", "vision tower"}
    assert report["dtype"] == ("bfloat16" if facts.native_bf16 else "float32")
    text = CliRunner().invoke(app, ["env", "--dtype", "fp32"]).stdout
    assert "--quantize int8" in text and ("fbgemm" in text or "bf16 activations" in text)


def test_an_int8_model_without_a_fast_kernel_says_so(tmp_path):
    from tests.fixtures.checkpoints import make_tiny_checkpoint, write_images

    ckpt = make_tiny_checkpoint(tmp_path / "m")
    [image] = write_images(tmp_path, 1)
    result = CliRunner().invoke(app, ["ask", str(image), "q", "--model", str(ckpt), "--quantize", "int8",
                                      "--dtype", "fp16", "--max-tokens", "2"])
    assert result.exit_code == 0, result.output
    assert "no fast int8 kernel for float16" in result.stderr
    result = CliRunner().invoke(app, ["ask", str(image), "q", "--model", str(ckpt), "--quantize", "int8",
                                      "--dtype", "fp32", "--max-tokens", "2"])
    assert result.exit_code == 0 and "no fast int8 kernel" not in result.stderr
