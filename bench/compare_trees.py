"""Decode speed of two source trees of this project on one checkpoint, alternating in fresh processes.

A refactor or a speed change is judged against the code before it on the same machine, in the same run:
each repetition runs tree A, then tree B (then A, ...), each in a new process that loads the checkpoint the
way `chat`/`caption` do (fast layout) or the way `ask` does, prefills one image and a prompt, and times
`--new-tokens` greedy steps. Medians and the B/A ratio are printed, with the machine.

    python bench/compare_trees.py --a /tmp/old-checkout --b . --model ~/.cache/paligemma-bench/paligemma-3b-224
    python bench/compare_trees.py --a /tmp/old-checkout --b . --model paligemma_cli/demo/model --reps 5

A tree is a folder holding `paligemma_cli/` (a `git worktree add /tmp/old-checkout <commit>` of an older
commit works); both the layout before and after the package split are understood.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from common import machine_info, machine_line

CHILD = r"""
import json, sys, time
import torch
from PIL import Image
try:
    from paligemma_cli.inference.pipeline import Pipeline
    from paligemma_cli.inference.generate import SamplingOptions, generate_tokens
except ImportError:  # the layout before the package split
    from paligemma_cli.core.pipeline import Pipeline
    from paligemma_cli.core.generate import SamplingOptions, generate_tokens
folder, dtype, fast, new_tokens, threads = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
pipe = Pipeline.load(folder, "cpu", dtype, "none", fast_layout=fast)
decoder = getattr(pipe, "decoder", pipe.model)
image = Image.new("RGB", (224, 224), (120, 160, 200))
batch = pipe.prepare([image], ["caption en"], new_tokens)
opts = SamplingOptions(max_new_tokens=new_tokens)
tokens, times = [], []
with torch.inference_mode():
    t0 = time.perf_counter()
    for step, token in enumerate(generate_tokens(decoder, batch, opts, eos_id=-1)):  # no early stop
        times.append(time.perf_counter())
        tokens.append(int(token[0]))
decode = (times[-1] - times[0]) / (len(times) - 1)
print(json.dumps({"ttft_s": times[0] - t0, "tokens_per_s": 1 / decode, "tokens": tokens}))
"""


def run_tree(tree: Path, args) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree.resolve()), "OMP_NUM_THREADS": str(args.threads)}
    out = subprocess.run([sys.executable, "-c", CHILD, str(args.model), args.dtype, "1" if args.fast else "0",
                          str(args.new_tokens), str(args.threads)], capture_output=True, text=True, env=env,
                         cwd="/", check=False)
    if out.returncode != 0:
        raise SystemExit(f"tree {tree} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", type=Path, required=True, help="the reference tree (e.g. the code before a change)")
    ap.add_argument("--b", type=Path, required=True, help="the tree to compare with it")
    ap.add_argument("--model", type=Path, required=True, help="checkpoint folder")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--fast", action=argparse.BooleanOptionalAction, default=True,
                    help="load with the fast layout (chat, caption, eval) or as `ask` does (--no-fast)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    print(machine_line(machine_info()), flush=True)
    results = {"a": [], "b": []}
    for rep in range(args.reps):
        for name, tree in (("a", args.a), ("b", args.b)) if rep % 2 == 0 else (("b", args.b), ("a", args.a)):
            r = run_tree(tree, args)
            results[name].append(r)
            print(f"rep {rep + 1} {name}: {r['tokens_per_s']:.2f} tok/s, TTFT {r['ttft_s']:.2f} s", flush=True)
    same = all(r["tokens"] == results["a"][0]["tokens"] for r in results["a"] + results["b"])
    summary = {}
    for name in ("a", "b"):
        tps = [r["tokens_per_s"] for r in results[name]]
        ttft = [r["ttft_s"] for r in results[name]]
        summary[name] = {"tokens_per_s_median": statistics.median(tps), "tokens_per_s": tps,
                         "ttft_s_median": statistics.median(ttft)}
    ratio = summary["b"]["tokens_per_s_median"] / summary["a"]["tokens_per_s_median"]
    print(f"A {args.a}: decode {summary['a']['tokens_per_s_median']:.2f} tok/s (all: "
          f"{', '.join(f'{x:.2f}' for x in summary['a']['tokens_per_s'])}), TTFT {summary['a']['ttft_s_median']:.2f} s")
    print(f"B {args.b}: decode {summary['b']['tokens_per_s_median']:.2f} tok/s (all: "
          f"{', '.join(f'{x:.2f}' for x in summary['b']['tokens_per_s'])}), TTFT {summary['b']['ttft_s_median']:.2f} s")
    print(f"B / A decode: {ratio:.3f}; greedy tokens identical in every run: {same}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_info(), "args": {k: str(v) for k, v in vars(args).items()},
                                         "summary": summary, "ratio_b_over_a": ratio, "same_tokens": same},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
