"""bf16 linears packed for oneDNN (`core/packed_linear.py`) and the init-free model skeleton (`core/empty_init.py`)."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch import nn

from paligemma_cli.checkpoints.hf import save_model
from paligemma_cli.errors import PaliGemmaError
from paligemma_cli.inference.pipeline import Pipeline
from paligemma_cli.model.paligemma import PaliGemma
from paligemma_cli.model.skeleton import empty_skeleton
from paligemma_cli.settings import DEMO_MODEL
from paligemma_cli.speed.cpu_layout import use_fast_cpu_layout
from paligemma_cli.speed.packed_linear import PackedLinear, can_pack, is_packed
from tests.speed.test_compiled_decode import IMAGE_TOKEN, tiny

needs_onednn_bf16 = pytest.mark.skipif(not can_pack(torch.zeros(1, dtype=torch.bfloat16)),
                                       reason="oneDNN has no bf16 matmul on this CPU")


@needs_onednn_bf16
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_gives_nn_linear_bits(bias):
    torch.manual_seed(0)
    linear = nn.Linear(96, 160, bias=bias).to(torch.bfloat16)
    packed = PackedLinear(linear)
    x = torch.randn(2, 7, 2 * 96, dtype=torch.bfloat16)
    for inp in (x[..., :96], x[..., ::2], x[0, -1:, :96], x[:, 3, :96]):  # 3-D, strided, 2-D views
        # Against a contiguous input: on a strided 3-D one `nn.Linear` adds the bias after rounding the
        # product to bf16 (two roundings, measured less accurate); the packed kernel rounds once, always.
        assert torch.equal(packed(inp), linear(inp.contiguous()))


@needs_onednn_bf16
def test_fast_layout_packs_every_bf16_linear_and_keeps_the_logits():
    model = tiny("gemma2").to(torch.bfloat16)
    reference = copy.deepcopy(model)
    n_linears = sum(type(m) is nn.Linear for m in model.modules())
    use_fast_cpu_layout(use_fast_cpu_layout(model))  # idempotent
    # Each decoder layer's q|k|v became one linear, and gate|up another: 3 fewer per layer.
    n_fused = 3 * len(model.language_model.layers)
    assert sum(isinstance(m, PackedLinear) for m in model.modules()) == n_linears - n_fused > 0
    assert not any(type(m) is nn.Linear for m in model.modules())
    attn, mlp = model.language_model.layers[0].self_attn, model.language_model.layers[0].mlp
    assert (attn.qkv_proj.out_features, mlp.gate_up_proj.out_features) == (4 * 8 + 2 * 2 * 8, 2 * 64)
    assert not hasattr(attn, "q_proj") and not hasattr(mlp, "up_proj")  # no second copy of the weights
    ids = torch.cat([torch.full((2, 4), IMAGE_TOKEN), torch.randint(3, 200, (2, 9))], 1)
    pixels = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        assert torch.equal(model(ids, pixels), reference(ids, pixels))
        caches = [m.new_cache(2, 20) for m in (model, reference)]
        for step in (ids, ids[:, -1:], ids[:, -2:-1]):  # prefill, then decode steps through the cache
            got, want = (m.extend(c, step, pixels if step is ids else None) for m, c in zip((model, reference), caches))
            assert torch.equal(got, want)


@needs_onednn_bf16
def test_projections_larger_than_the_bound_stay_separate(monkeypatch):
    import paligemma_cli.speed.cpu_layout as cpu_layout

    model = tiny("gemma").to(torch.bfloat16)
    attn = model.language_model.layers[0].self_attn
    qkv_bytes = sum(getattr(attn, n).weight.nbytes for n in ("q_proj", "k_proj", "v_proj"))  # 4 KB; gate|up 8 KB
    monkeypatch.setattr(cpu_layout, "FUSE_MAX_BYTES", qkv_bytes)
    reference = copy.deepcopy(model)
    use_fast_cpu_layout(model)
    for layer in model.language_model.layers:
        assert isinstance(layer.self_attn.qkv_proj, PackedLinear) and not hasattr(layer.mlp, "gate_up_proj")
        assert isinstance(layer.mlp.gate_proj, PackedLinear) and isinstance(layer.mlp.up_proj, PackedLinear)
    ids = torch.cat([torch.full((1, 4), IMAGE_TOKEN), torch.randint(3, 200, (1, 5))], 1)
    pixels = torch.randn(1, 3, 16, 16)
    with torch.inference_mode():
        assert torch.equal(model(ids, pixels), reference(ids, pixels))


@needs_onednn_bf16
def test_a_packed_model_is_not_saved(tmp_path):
    model = use_fast_cpu_layout(tiny("gemma").to(torch.bfloat16))
    assert is_packed(model)
    with pytest.raises(PaliGemmaError, match="packed"):
        save_model(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_pipeline_keeps_mapped_weights_by_default_and_float32_linears_with_fast_layout():
    fp32 = Pipeline.load(DEMO_MODEL, "cpu", "fp32", fast_layout=True).model
    assert not is_packed(fp32) and any(type(m) is nn.Linear for m in fp32.modules())
    mapped = Pipeline.load(DEMO_MODEL, "cpu", "bf16").model  # one short answer: weights as mapped
    assert not is_packed(mapped) and any(type(m) is nn.Linear for m in mapped.modules())


@needs_onednn_bf16
def test_pipeline_fast_layout_packs_bf16_and_answers_the_same():
    mapped = Pipeline.load(DEMO_MODEL, "cpu", "bf16").model
    fast = Pipeline.load(DEMO_MODEL, "cpu", "bf16", fast_layout=True).model
    assert is_packed(fast)
    ids = torch.cat([torch.full((1, 64), fast.config.image_token_id), torch.randint(3, 1000, (1, 6))], 1)
    pixels = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(fast(ids, pixels), mapped(ids, pixels))


def test_empty_skeleton_skips_init_and_restores_it():
    original = nn.init.normal_
    with empty_skeleton():
        assert nn.init.normal_ is not original
        model = PaliGemma(tiny("gemma").config)
    assert nn.init.normal_ is original
    assert {p.device.type for p in model.parameters()} == {"meta"}
    with pytest.raises(RuntimeError, match="boom"), empty_skeleton():
        raise RuntimeError("boom")
    assert nn.init.normal_ is original
    t = torch.empty(1000)
    nn.init.normal_(t)  # the real init again
    assert t.std() > 0.5


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps; a no-op elsewhere")
def test_released_pages_of_a_mapped_weight_read_back_the_same_and_other_memory_is_untouched(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from paligemma_cli.speed.mapped_pages import release_mapped_pages, safetensors_mappings

    weights = {"a": torch.randn(512, 1024), "b": torch.randn(300, 7)}
    save_file(weights, str(tmp_path / "w.safetensors"))
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as f:
        mapped = {k: f.get_tensor(k) for k in weights}
    mappings = safetensors_mappings()
    assert mappings  # the open file's mapping is found
    assert release_mapped_pages(mapped["a"], mappings) >= 512 * 1024 * 4 - 2 * 4096  # whole pages inside it
    assert torch.equal(mapped["a"], weights["a"]) and torch.equal(mapped["b"], weights["b"])  # faulted back
    anonymous = weights["a"].clone()
    assert release_mapped_pages(anonymous, mappings) == 0  # not in a file mapping: left alone
    assert torch.equal(anonymous, weights["a"])
