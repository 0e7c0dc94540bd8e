"""What each inference optimisation gives: switch one off at a time and measure TTFT and decode speed.

Loads one checkpoint (as `common.prepare` builds it: `demo`, `mid`, `paligemma-3b-224`, ...) with the fast
CPU layout (`use_fast_cpu_layout`, as chat, caption of 4+ images and eval load) and runs this project's
generation (`generate_tokens`, batch 1, prompt "caption en", greedy, exactly `--new-tokens` tokens) with
everything on ("baseline") and with each optimisation undone in turn. The undoing is a patch of
`paligemma_cli.model.gemma` / `paligemma_cli.model.kv_cache` applied only inside this script, for the
length of one measurement:

  sdpa          `F.scaled_dot_product_attention` -> softmax(q k^T * scale + bias) v written out
                (in the vision tower too)
  static-cache  the preallocated KV cache -> a cache grown with `torch.cat` at every step
                (what `transformers`' DynamicCache does)
  last-logits   logits of the last prompt position only -> all positions through the tied head,
                and the last layer's attention output and MLP for every position
  gqa-no-repeat K/V shared by the query heads of a group -> K/V repeated per query head (repeat_kv)
  rope-table    precomputed cos/sin table -> cos/sin computed from the positions at every call
  bias-once     one attention bias per forward pass -> one per layer

plus "stock-layout", a second load of the same checkpoint kept in memory beside the first and measured
in the same rotation: the weights as loaded, without `use_fast_cpu_layout` (bf16: no oneDNN packing and
no merged projections; fp32: row-major); and, measured from separate loads afterwards: float32 instead of bfloat16 weights, and
1 thread instead of all physical cores. After one uncounted warm-up run, each repetition runs every
variant once, the order rotated by one place per repetition, so drift hits all alike; the table gives medians and each variant's ratio to the baseline (decode
tokens/s: ablated / baseline, below 1 means the optimisation helps; TTFT: ablated / baseline, above
1 means it helps). Greedy tokens of every patched variant are checked equal to the baseline's.

    python bench/ablations.py --config mid --reps 3
    python bench/ablations.py --config paligemma-3b-224 --reps 2 --new-tokens 16 --json ablations-3b.json

Prints numbers only; not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from common import (
    DEFAULT_CACHE,
    load,
    log,
    machine_info,
    machine_line,
    median,
    prepare,
    release_memory,
    run_b1,
    set_threads,
)

from paligemma_cli.model import gemma
from paligemma_cli.model.kv_cache import KVCache


@contextlib.contextmanager
def patched(obj, name: str, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


# --- the optimisations, undone -------------------------------------------------------------------


def naive_sdpa(q, k, v, attn_mask=None, scale=None, **_):
    scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if attn_mask is not None:
        scores = scores + attn_mask
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def no_sdpa():
    return patched(gemma.F, "scaled_dot_product_attention", naive_sdpa)


def cat_cache():
    """Keys/values kept as tensors that `torch.cat` grows at every step; the preallocated buffers unused."""

    def write(self, layer, k, v):
        grown = self.__dict__.setdefault("_grown", {})
        if layer in grown and grown[layer][0].shape[2] == self.length:
            k = torch.cat([grown[layer][0], k], 2)
            v = torch.cat([grown[layer][1], v], 2)
        grown[layer] = (k, v)
        return k, v

    return patched(KVCache, "write", write)


def all_logits():
    """Every layer runs every position, and every position goes through the tied head."""
    forward = gemma.GemmaDecoder.forward

    def full(self, x, positions, masks, cache=None, last_only=False):
        h = forward(self, x, positions, masks, cache, False)
        self.logits(h)  # (B, T, V), as a model without the last-slot shortcut computes; `extend` keeps row -1
        return h

    return patched(gemma.GemmaDecoder, "forward", full)


def repeat_kv():
    """GQA the plain way: K/V repeated to one head per query head before attention. (`project` gives
    q, k, v of a `GemmaAttention` and of the merged-projection `FusedGemmaAttention` the fast layout uses.)"""

    def forward(self, x, cos, sin, bias, cache=None, last_only=False):
        B, T, _ = x.shape
        H, KV, hd = self.n_heads, self.n_kv, self.head_dim
        G = H // KV
        q, k, v = self.project(x, last_only)
        k = gemma.apply_rope_folded(k.view(B, T, KV, hd), cos, sin).transpose(1, 2)
        v = v.view(B, T, KV, hd).transpose(1, 2)
        if last_only:
            cos, sin, T = cos[:, -1:], sin[:, -1:], 1
        q = gemma.apply_rope_folded(q.view(B, T, H, hd), cos, sin).transpose(1, 2)  # (B, H, T, hd)
        if cache is not None:
            k, v = cache.write(self.layer_idx, k, v)
        k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)  # (B, H, S, hd)
        # The stacked bias has row t*G + g; one row per token serves every head here.
        mask = bias.view(B, 1, T, G, -1)[:, :, :, 0]
        if self.softcap:
            scores = (q @ k.transpose(-1, -2)) * self.scale
            scores = torch.tanh(scores / self.softcap) * self.softcap + mask
            y = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * hd))

    return patched(gemma.GemmaAttention, "forward", forward)


def no_rope_table():
    def lookup(self, positions, bound, dtype):
        cos, sin = gemma.rope_cos_sin(positions, self.head_dim, self.theta, dtype)  # (B, 1, T, hd)
        half = self.head_dim // 2
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        return cos.transpose(1, 2), sin.transpose(1, 2)  # (B, T, 1, hd)

    return patched(gemma.RopeTable, "lookup", lookup)


@contextlib.contextmanager
def bias_per_layer():
    """`attention_bias` rebuilt inside every layer from the boolean mask, instead of once per forward."""
    decoder_forward, layer_forward = gemma.GemmaDecoder.forward, gemma.GemmaDecoderLayer.forward
    masks_now = {}

    def decoder(self, x, positions, masks, cache=None, last_only=False):
        masks_now.update(masks)
        return decoder_forward(self, x, positions, masks, cache, last_only)

    def layer(self, x, cos, sin, bias, cache=None, last_only=False):
        G = self.self_attn.n_heads // self.self_attn.n_kv
        bias = gemma.attention_bias(masks_now[self.window], G, x.dtype)
        return layer_forward(self, x, cos, sin, bias[:, :, -G:] if last_only else bias, cache, last_only)

    with patched(gemma.GemmaDecoder, "forward", decoder), patched(gemma.GemmaDecoderLayer, "forward", layer):
        yield


PATCHES = {
    "sdpa": no_sdpa,
    "static-cache": cat_cache,
    "last-logits": all_logits,
    "gqa-no-repeat": repeat_kv,
    "rope-table": no_rope_table,
    "bias-once": bias_per_layer,
}


# --- measuring -----------------------------------------------------------------------------------


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="mid", help="demo, mid, or a preset name (paligemma-3b-224, ...)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="default: physical cores available")
    ap.add_argument("--skip", default="", help="comma list of variants to leave out (e.g. fp32,1-thread)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    threads = set_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    machine = machine_info()
    print(machine_line(machine))
    prep = prepare(args.config, DEFAULT_CACHE, need_hf=False)
    dtype = "fp32" if args.config == "demo" else "bf16"
    log(f"{args.config}: {prep['folder']} in {dtype}, {threads} threads, {args.new_tokens} new tokens")

    results: dict[str, list[dict]] = {}

    def record(name, r):
        results.setdefault(name, []).append(r)
        if r["ids"] != reference:
            log(f"  {name}: greedy tokens differ from the baseline's")
            r["same_tokens"] = False

    pipe = load("ours", prep["folder"], dtype, None, fast=True)  # every optimisation on
    reference = run_b1(pipe, prep, args.new_tokens)["ids"]  # warm-up (faults the weights in), not counted
    names = ["baseline"] + [n for n in PATCHES if n not in skip]
    pipes = dict.fromkeys(names, pipe)
    if "stock-layout" not in skip:
        pipes["stock-layout"] = load("ours", prep["folder"], dtype, None)  # no use_fast_cpu_layout
        run_b1(pipes["stock-layout"], prep, args.new_tokens)  # warm-up, not counted
        names.append("stock-layout")
    for rep in range(args.reps):
        order = names[rep % len(names):] + names[:rep % len(names)]  # each variant takes each turn in time
        for name in order:
            with PATCHES[name]() if name in PATCHES else contextlib.nullcontext():
                record(name, run_b1(pipes[name], prep, args.new_tokens))
        log(f"rep {rep + 1}/{args.reps}: " + ", ".join(
            f"{k} {v[-1]['decode_tok_s']:.2f} tok/s {v[-1]['ttft_s']:.2f} s" for k, v in results.items()))
    if "1-thread" not in skip and threads > 1:
        torch.set_num_threads(1)
        for _ in range(args.reps):
            record("1-thread", run_b1(pipe, prep, args.new_tokens))
        torch.set_num_threads(threads)
    del pipe, pipes
    release_memory()
    other = "bf16" if dtype == "fp32" else "fp32"
    if other not in skip:
        pipe = load("ours", prep["folder"], other, None, fast=True)
        run_b1(pipe, prep, args.new_tokens)  # warm-up, not counted
        for _ in range(args.reps):
            r = run_b1(pipe, prep, args.new_tokens)
            r.pop("ids")  # another dtype may round to other tokens; not a failure
            results.setdefault(other, []).append(r)
        del pipe
        release_memory()

    base = {k: median([r[k] for r in results["baseline"]]) for k in ("ttft_s", "decode_tok_s")}
    table = {}
    for name, runs in results.items():
        ttft = median([r["ttft_s"] for r in runs])
        tok_s = median([r["decode_tok_s"] for r in runs])
        table[name] = {"ttft_s": round(ttft, 4), "decode_tok_s": round(tok_s, 3),
                       "ttft_vs_baseline": round(ttft / base["ttft_s"], 3),
                       "decode_vs_baseline": round(tok_s / base["decode_tok_s"], 3),
                       "same_tokens": all(r.get("same_tokens", True) for r in runs)}
    print(f"{'variant':<16}{'TTFT s':>10}{'x base':>8}{'decode tok/s':>14}{'x base':>8}  same tokens")
    for name, row in table.items():
        print(f"{name:<16}{row['ttft_s']:>10.3f}{row['ttft_vs_baseline']:>8.2f}{row['decode_tok_s']:>14.2f}"
              f"{row['decode_vs_baseline']:>8.2f}  {row['same_tokens'] if name not in ('fp32', 'bf16') else '-'}")
    out = {"config": args.config, "dtype": dtype, "threads": threads, "new_tokens": args.new_tokens,
           "reps": args.reps, "cpu": machine["cpu"], "torch": torch.__version__, "variants": table,
           "machine": machine}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
