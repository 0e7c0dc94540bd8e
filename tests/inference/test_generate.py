"""Sampling properties: what top-k and top-p keep, seeds, and the greedy limit."""

import torch

from paligemma_cli.inference.generate import SamplingOptions, filter_logits, sample


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5]])
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept.tolist() == [[False, True, False, True, False]]


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    assert torch.isfinite(filter_logits(logits, top_p=0.5)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.6)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.8)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.81)).tolist() == [[True, True, True, False]]
    # Always at least one token, however small p is.
    assert torch.isfinite(filter_logits(logits, top_p=1e-6)).sum() == 1


def test_sampled_tokens_never_leave_the_kept_set():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50, generator=g) * 3
    for opts in (SamplingOptions(temperature=1.5, top_k=5), SamplingOptions(temperature=2.0, top_p=0.7),
                 SamplingOptions(temperature=1.0, top_k=7, top_p=0.9)):
        allowed = torch.isfinite(filter_logits(logits / opts.temperature, opts.top_k, opts.top_p))
        for _ in range(20):
            tokens = sample(logits, opts, g)
            assert allowed.gather(1, tokens[:, None]).all()


def test_sampling_spreads_over_the_kept_set():
    logits = (-0.1 * torch.arange(10.0)).repeat(2000, 1)
    tokens = sample(logits, SamplingOptions(temperature=1.0, top_k=4), torch.Generator().manual_seed(1))
    assert set(tokens.tolist()) == {0, 1, 2, 3}


def test_low_temperature_equals_greedy():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(32, 100, generator=g)
    cold = sample(logits, SamplingOptions(temperature=1e-4), g)
    assert torch.equal(cold, logits.argmax(-1))
    assert torch.equal(sample(logits, SamplingOptions(temperature=0.0)), logits.argmax(-1))


def test_same_seed_same_sample():
    logits = torch.randn(4, 100)
    a = sample(logits, SamplingOptions(temperature=1.0), torch.Generator().manual_seed(7))
    b = sample(logits, SamplingOptions(temperature=1.0), torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
