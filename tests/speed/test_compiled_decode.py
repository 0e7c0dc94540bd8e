"""`--compile`: decode steps through torch.compile give the eager model's logits, from one graph.

Compiling takes tens of seconds on a small CPU, so the tests compile few graphs: tiny models, and the
checks that the cache length is rounded (prompts of other lengths reuse the graph) ride along.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch._dynamo
from typer.testing import CliRunner

from paligemma_cli.cli import app
from paligemma_cli.model.config import PaliGemmaConfig, TextConfig, VisionConfig
from paligemma_cli.model.paligemma import PaliGemma
from paligemma_cli.speed.compiled_decode import COMPILED_CACHE_STEP, CompiledDecoder
from paligemma_cli.speed.cpu_layout import use_fast_cpu_layout
from paligemma_cli.speed.packed_linear import can_pack

IMAGE_TOKEN = 250


def tiny(model_type: str) -> PaliGemma:
    gemma2 = dict(query_pre_attn_scalar=16, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                  sliding_window=6, layer_types=["sliding_attention", "full_attention"])
    cfg = PaliGemmaConfig(
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            image_size=16, patch_size=8),
        text=TextConfig(model_type=model_type, vocab_size=256, hidden_size=32, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                        max_position_embeddings=1024, **(gemma2 if model_type == "gemma2" else {})),
        image_token_id=IMAGE_TOKEN,
    )
    torch.manual_seed(0)
    model = PaliGemma(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def decode_logits(model, prompt_len: int, steps: int) -> tuple[list[torch.Tensor], int]:
    """As a chat turn: prefill the image block (4 image tokens, bos), then the question's `prompt_len` - 5
    text tokens (prefix, type 0) in a second call, then `steps` greedy decode steps. All logits.
    `model` is a PaliGemma or a `CompiledDecoder` of one."""
    g = torch.Generator().manual_seed(prompt_len)
    image_block = torch.cat([torch.full((1, 4), IMAGE_TOKEN), torch.tensor([[2]])], 1)
    question = torch.randint(3, 200, (1, prompt_len - 5), generator=g)
    pixels = torch.randn(1, 3, 16, 16, generator=g)
    cache = model.new_cache(1, prompt_len + steps)
    with torch.inference_mode():
        model.extend(cache, image_block, pixels, torch.zeros_like(image_block))  # eager: it has pixels
        logits = model.extend(cache, question, token_type_ids=torch.zeros_like(question))
        out = [logits.clone()]
        for _ in range(steps):
            logits = model.extend(cache, logits.argmax(-1)[:, None])
            out.append(logits.clone())
    return out, cache.max_len


@pytest.mark.parametrize("model_type", ["gemma", "gemma2"])
def test_compiled_questions_and_decode_steps_equal_eager_ones_from_two_graphs(model_type):
    model = tiny(model_type)
    # Steps run past Gemma 2's sliding window (6), so the window mask over the whole cache is exercised.
    # Two question lengths (7 and 25 tokens): the second reuses the graph with a symbolic length.
    eager = [decode_logits(model, n, 9)[0] for n in (12, 30)]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = CompiledDecoder(model)
    for n, want in zip((12, 30), eager):
        got, max_len = decode_logits(compiled, n, 9)
        assert max_len == COMPILED_CACHE_STEP  # rounded up: both prompts share one cache size
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    counters = torch._dynamo.utils.counters
    # Decode steps (one token) and questions (any length) compile one graph each, then no more.
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.skipif(not can_pack(torch.zeros(1, dtype=torch.bfloat16)), reason="oneDNN has no bf16 matmul here")
def test_compiled_packed_bf16_model_is_as_close_to_float32_as_eager():
    reference, _ = decode_logits(tiny("gemma2"), 12, 4)  # float32
    model = use_fast_cpu_layout(tiny("gemma2").to(torch.bfloat16))  # packed, q|k|v and gate|up fused
    eager, _ = decode_logits(model, 12, 4)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled, _ = decode_logits(CompiledDecoder(model), 12, 4)
    for got, want, exact in zip(compiled, eager, reference):
        # The graph rounds to bf16 in other places than eager does (it fuses ops in float32), so the
        # logits differ by bf16 noise (~0.05 here, on logits up to 8): as far from float32 as eager's.
        error, eager_error = ((t.float() - exact).abs().max() for t in (got, want))
        assert error <= 2 * eager_error + 0.01, (error, eager_error)
        assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    assert not torch._dynamo.utils.counters["graph_break"]


def test_ask_compile_int8_gives_the_eager_answer():
    runner = CliRunner()
    image = Path(__file__).parents[2] / "examples" / "shapes.png"
    args = ["ask", str(image), "--prompt", "caption en", "--dtype", "bf16", "--quantize", "int8"]
    eager = runner.invoke(app, args)
    compiled = runner.invoke(app, args + ["--compile"])
    assert eager.exit_code == 0 and compiled.exit_code == 0, compiled.stderr
    assert compiled.stdout == eager.stdout and eager.stdout.startswith("a green square")


def test_chat_compile_answers_as_eager_chat_does():
    image = Path(__file__).parents[2] / "examples" / "shapes.png"
    questions = "what color is the circle?\nhow many shapes are there?\n/prompt caption en\n"
    runner = CliRunner()
    eager = runner.invoke(app, ["chat", str(image)], input=questions)
    compiled = runner.invoke(app, ["chat", str(image), "--compile"], input=questions)
    assert eager.exit_code == 0 and compiled.exit_code == 0, compiled.stderr
    assert compiled.stdout == eager.stdout and len(eager.stdout.splitlines()) == 3
