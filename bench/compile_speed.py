"""What `--compile` gives: decode tokens/s and TTFT of eager vs compiled decode steps, same process.

For each of bf16 and `--quantize int8` (bf16 activations): load the checkpoint (as `bench/speed.py`
builds it), time `--reps` eager generations (batch 1, prompt "caption en", greedy, exactly
`--new-tokens` tokens), then `compile_decode()`, time the first compiled generation (it compiles:
reported as compile time) and `--reps` more. Greedy tokens of compiled and eager runs are compared.

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

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

import speed  # noqa: E402
import torch  # noqa: E402


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
    threads = args.threads or speed.physical_cores()
    torch.set_num_threads(threads)
    prep = speed.prepare(args.config, Path.home() / ".cache" / "paligemma-bench", need_hf=False)
    batch, pad_id = prep["inputs"]["b1"], prep["inputs"]["pad_id"]
    out = {"config": args.config, "dtype": args.dtype,  "threads": threads, "new_tokens": args.new_tokens,
           "torch": torch.__version__, "cpu": speed.cpu_model(), "runs": {}}
    for quant in args.quantize.split(","):
        pipe = speed.load("ours", prep["folder"], args.dtype, None if quant == "none" else quant)
        speed.generate("ours", pipe, batch, 2, pad_id)  # fault the weights in
        eager = [speed.generate("ours", pipe, batch, args.new_tokens, pad_id) for _ in range(args.reps)]
        pipe.compile()
        t0 = time.perf_counter()
        first = speed.generate("ours", pipe, batch, args.new_tokens, pad_id)
        compile_s = time.perf_counter() - t0 - first["ttft_s"] - (args.new_tokens - 1) / speed.median(
            [r["decode_tok_s"] for r in eager])  # the first compiled run less what it would take eagerly
        compiled = [speed.generate("ours", pipe, batch, args.new_tokens, pad_id) for _ in range(args.reps)]
        row = {
            "eager_decode_tok_s": speed.median([r["decode_tok_s"] for r in eager]),
            "compiled_decode_tok_s": speed.median([r["decode_tok_s"] for r in compiled]),
            "eager_ttft_s": speed.median([r["ttft_s"] for r in eager]),
            "compiled_ttft_s": speed.median([r["ttft_s"] for r in compiled]),
            "compile_s_approx": round(compile_s, 1),
            "same_tokens": all(r["ids"] == eager[0]["ids"] for r in compiled + [first]),
        }
        row["decode_speedup"] = round(row["compiled_decode_tok_s"] / row["eager_decode_tok_s"], 3)
        out["runs"][quant] = row
        speed.log(f"{quant}: {json.dumps(row)}")
        del pipe
        torch._dynamo.reset()
        speed.release_memory()
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
