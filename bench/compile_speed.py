"""What `--compile` gives: decode tokens/s and TTFT of eager vs compiled decode steps, same process.

For each of bf16 and `--quantize int8` (bf16 activations): load the checkpoint (as `common.prepare`
builds it), time `--reps` eager generations (batch 1, prompt "caption en", greedy, exactly
`--new-tokens` tokens), then `Pipeline.compile()` (a `CompiledDecoder`, which first gives the weights
the fast CPU layout), time the first compiled generation (it compiles: reported as compile time) and
`--reps` more. Greedy tokens of compiled and eager runs are compared.

    python bench/compile_speed.py --config paligemma-3b-224 --reps 2 --new-tokens 32
    python bench/compile_speed.py --config demo --quantize none --reps 5

Prints numbers only; not a test.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
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


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="mid")
    ap.add_argument("--quantize", default="none,int8", help="comma list of none, int8")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    threads = set_threads(args.threads)
    machine = machine_info()
    print(machine_line(machine), file=sys.stderr)  # stdout is the JSON alone
    prep = prepare(args.config, DEFAULT_CACHE, need_hf=False)
    out = {"config": args.config, "dtype": args.dtype,  "threads": threads, "new_tokens": args.new_tokens,
           "torch": torch.__version__, "cpu": machine["cpu"], "machine": machine, "runs": {}}
    for quant in args.quantize.split(","):
        pipe = load("ours", prep["folder"], args.dtype, None if quant == "none" else quant)
        run_b1(pipe, prep, 2)  # fault the weights in
        eager = [run_b1(pipe, prep, args.new_tokens) for _ in range(args.reps)]
        pipe.compile()
        t0 = time.perf_counter()
        first = run_b1(pipe, prep, args.new_tokens)
        compile_s = time.perf_counter() - t0 - first["ttft_s"] - (args.new_tokens - 1) / median(
            [r["decode_tok_s"] for r in eager])  # the first compiled run less what it would take eagerly
        compiled = [run_b1(pipe, prep, args.new_tokens) for _ in range(args.reps)]
        row = {
            "eager_decode_tok_s": median([r["decode_tok_s"] for r in eager]),
            "compiled_decode_tok_s": median([r["decode_tok_s"] for r in compiled]),
            "eager_ttft_s": median([r["ttft_s"] for r in eager]),
            "compiled_ttft_s": median([r["ttft_s"] for r in compiled]),
            "compile_s_approx": round(compile_s, 1),
            "same_tokens": all(r["ids"] == eager[0]["ids"] for r in compiled + [first]),
        }
        row["decode_speedup"] = round(row["compiled_decode_tok_s"] / row["eager_decode_tok_s"], 3)
        out["runs"][quant] = row
        log(f"{quant}: {json.dumps(row)}")
        del pipe
        torch._dynamo.reset()
        release_memory()
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
