"""The model core against transformers' PaliGemmaForConditionalGeneration on tiny random checkpoints."""

import pytest
import torch

from paligemma_cli.checkpoints.hf import load_model
from paligemma_cli.inference.generate import SamplingOptions, generate
from tests.fixtures.hf_reference import hf_position_ids, make_inputs

TOL = 1e-4


@pytest.fixture(scope="module")
def models(hf_checkpoint):
    folder, hf = hf_checkpoint
    return load_model(folder), hf


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_logits_match_transformers(models, padding_side):
    ours, hf = models
    batch = make_inputs([7, 3], padding_side, suffix_lengths=[4, 6], seed=1)
    with torch.no_grad():
        expected = hf(**batch, position_ids=hf_position_ids(batch["attention_mask"])).logits
        got = ours(**batch)
    real = batch["attention_mask"].bool()
    assert got.shape == expected.shape
    err = (got[real] - expected[real]).abs().max().item()
    assert err < TOL, f"max abs logit error {err}"
    # The numbers must actually depend on the image and the mask, or this test proves nothing.
    assert expected[real].std() > 0.1


def test_prefix_is_bidirectional_and_suffix_causal(models):
    ours, _ = models
    batch = make_inputs([6], suffix_lengths=[5], seed=2)
    with torch.no_grad():
        base = ours(**batch)
        changed = dict(batch, input_ids=batch["input_ids"].clone())
        changed["input_ids"][0, -1] = (changed["input_ids"][0, -1] + 1) % 299 + 1  # last suffix token
        after = ours(**changed)
        changed_prefix = dict(batch, input_ids=batch["input_ids"].clone())
        changed_prefix["input_ids"][0, 20] += 1  # a late prefix token
        after_prefix = ours(**changed_prefix)
    assert torch.equal(base[0, :-1], after[0, :-1])  # nothing before a suffix token sees it
    assert not torch.allclose(base[0, :16], after_prefix[0, :16])  # image tokens see the later prefix


def test_cached_decoding_equals_full_forward(models):
    ours, _ = models
    batch = make_inputs([5, 2], "left", seed=3)
    steps = 20
    cache = ours.new_cache(2, batch["input_ids"].shape[1] + steps)
    ids, mask, types = batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
    with torch.no_grad():
        logits = ours.extend(cache, ids, batch["pixel_values"], types, mask)
        for _ in range(steps):
            full = ours(ids, batch["pixel_values"], types, mask)[:, -1]
            err = (logits - full).abs().max().item()
            assert err < TOL, f"cached step differs by {err}"
            token = logits.argmax(-1)
            ids = torch.cat([ids, token[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(token[:, None])], 1)
            types = torch.cat([types, torch.ones_like(token[:, None])], 1)
            logits = ours.extend(cache, token[:, None])


def test_greedy_tokens_equal_transformers_generate(models):
    ours, hf = models
    batch = make_inputs([6, 3], "left", seed=4)
    with torch.no_grad():
        out = hf.generate(**batch, max_new_tokens=20, do_sample=False, eos_token_id=1, pad_token_id=0)
    expected = out[:, batch["input_ids"].shape[1]:]
    got = generate(ours, batch, SamplingOptions(max_new_tokens=20), eos_id=1, pad_id=0)
    assert got.shape[1] == expected.shape[1]
    assert torch.equal(got, expected), f"\n{got}\n{expected}"
    assert len(set(got[0].tolist())) > 2  # a degenerate model repeating one token would prove little


@pytest.mark.parametrize("images_per_row", [(2, 2), (3, 3), (3, 1)])
def test_several_images_per_prompt_match_transformers(models, images_per_row):
    """NLVR2-style prompts: each row's images' tokens in order, then <bos>, the prefix and the suffix."""
    ours, hf = models
    n_img = 16  # IMAGE_SIZE // PATCH squared, as in make_inputs
    g = torch.Generator().manual_seed(7)
    rows = []
    for k in images_per_row:
        prefix = torch.randint(4, 300, (5,), generator=g).tolist()
        suffix = torch.randint(4, 300, (3,), generator=g).tolist()
        rows.append(([300] * n_img * k + [2] + prefix + suffix, [0] * (n_img * k + 1 + 5) + [1] * 3))
    T = max(len(ids) for ids, _ in rows)
    batch = {k: torch.zeros(len(rows), T, dtype=torch.long) for k in ("input_ids", "attention_mask", "token_type_ids")}
    for i, (ids, types) in enumerate(rows):
        batch["input_ids"][i, T - len(ids):] = torch.tensor(ids)
        batch["attention_mask"][i, T - len(ids):] = 1
        batch["token_type_ids"][i, T - len(ids):] = torch.tensor(types)
    batch["pixel_values"] = torch.rand(sum(images_per_row), 3, 28, 28, generator=g) * 2 - 1
    with torch.no_grad():
        expected = hf(**batch, position_ids=hf_position_ids(batch["attention_mask"])).logits
        got = ours(**batch)
        swapped = ours(**dict(batch, pixel_values=batch["pixel_values"].flip(0)))
    real = batch["attention_mask"].bool()
    err = (got[real] - expected[real]).abs().max().item()
    assert err < TOL, f"max abs logit error {err}"
    assert (swapped[real] - got[real]).abs().max() > 1e-3  # the order of the images matters
