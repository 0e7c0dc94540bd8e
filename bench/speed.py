"""Speed and memory of this project's inference against `transformers`, beside measured rooflines.

One run of this script measures, on one named model shape and on identical inputs (the same
`pixel_values` and the `input_ids` built by this project's processor), for this project ("ours", also
with `--quantize int8` where `paligemma_cli.speed.quantize` exists) and for
`transformers.PaliGemmaForConditionalGeneration` ("HF"), in each dtype of `--dtype`:

  load           `Pipeline.load` / `from_pretrained`; the first load of the run, warm loads (every
                 later one: the files sit in the page cache), and the load in a fresh process
  peak RSS       of a fresh child process (`--child rss`) after load + one generation: VmHWM, not
                 `ru_maxrss`, which Linux carries over from the forking parent across exec
  TTFT           vision tower + prefill + first greedy token, batch 1, prompt "caption en"
  decode         tokens/s after the first token, greedy, exactly `--new-tokens` tokens (eos ignored)
  caption        images/s at batch 1 (the TTFT run's total time) and at batch 8, `--new-tokens` tokens
  chat           ours only: `ChatSession` TTFT of a second question about the same image
  process start  first byte on stdout of `paligemma ask IMG --prompt "caption en"` vs. a minimal plain
                 transformers script (load, process, generate with a streamer), both as subprocesses

Generation paths (the fastest fair one each offers without compiling):
  ours: `inference.generate.generate_tokens` (what `Pipeline.stream`/`generate` run) with eos_id=-1, so it
        never stops early; a preallocated KV cache, logits of the last slot only.
  HF:   `model.generate(min_new_tokens=N, max_new_tokens=N, do_sample=False)`, its default
        DynamicCache; a streamer that only records the time of each token gives TTFT at batch 1.

Implementations alternate within each repetition (order reversed on odd ones), each loaded afresh
and freed after its turn, so only one model is in memory at a time. A 2-token warm-up runs
after every load (its TTFT is reported as "first call after load": it also pays for faulting in
memory-mapped weights); the other figures are medians over `--reps` with (min-max).

Rooflines, measured in the same run at the same thread count: read bandwidth (`.sum()` of a 1 GiB
tensor); `F.linear(x[1,K], W[N,K])` GB/s on the model's own decoder shapes (rotating over enough
copies that every call streams from DRAM, as decode does), int8 `_weight_int8pack_mm` GB/s, and
matmul FLOP/s on the prefill shapes. Decode roofline = bandwidth / bytes of weights read per token
(every decoder linear + the tied head once at full vocab; not the vision tower; the KV cache, well
under 1 %, is left out); "matvec ceiling" = the same bytes at the measured matvec speed. Prefill
roofline = the matmul FLOPs any implementation must do (vision tower, projector, decoder, attention
scores; the last decoder layer's query/output/MLP and the head for the last position only) at the
FLOP/s measured for each shape; norms and activations are not counted. Rooflines use medians too:
on a busy machine a measured figure can land above its roofline (fraction > 1).

Checkpoints: `demo` is the shipped `paligemma_cli/demo/model`; every other config is a random
checkpoint written once by transformers' `save_pretrained` (bf16, the hub's key layout) into
`~/.cache/paligemma-bench/<config>-bf16/`, with a tiny SentencePiece tokenizer trained by this
project (the real 257k tokenizer can't be built offline) whose `<image>` id the config uses; the
embedding keeps the real vocab (257216 rows), so the tied head costs what it really costs. Rows
of ids the tokenizer lacks (and pad/eos/bos/unk) are zero, so greedy decoding emits printable text.

    python bench/speed.py --config demo --reps 2 --threads 1
    python bench/speed.py --config mid --dtype bf16 --reps 2 --json /tmp/mid.json
    python bench/speed.py --config paligemma-3b-224 --json speed-3b.json     # ~25 GB RAM free, ~1 h
    python bench/speed.py --config mid --skip transformers,process-start

`mid` = paligemma-3b-224 with 2 of 18 decoder layers and 3 of 27 vision layers (~0.8 B params, 0.53 B of
them the embedding): every per-layer cost is 1/9 of the full model's, the head is full size.
The shared helpers (rooflines, checkpoints, loading, timing, child processes) are in bench/common.py.
Prints numbers only; not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

from common import (
    BATCH,
    DEFAULT_CACHE,
    DTYPE_NAMES,
    PROMPT,
    REPORT_FLAGS,
    ask_has_quantize,
    chat_ttft,
    child_env,
    child_rss,
    cpu_flags,
    cpu_model,
    first_byte,
    generate,
    int8_available,
    load,
    log,
    machine_info,
    machine_line,
    package_version,
    param_count,
    physical_cores,
    prepare,
    process_start_cmd,
    release_memory,
    roofline_times,
    rooflines,
    rss_gb,
    run_rss_child,
    summarize,
)

SKIPPABLE = ("transformers", "rss", "process-start", "chat", "batch", "rooflines", "int8", "fast-layout")


# --- the run ---------------------------------------------------------------------------------------


def variants(args, int8: bool) -> list[dict]:
    out = []
    for dt in args.dtypes:
        out.append({"name": f"ours {dt}", "impl": "ours", "dtype": dt, "quant": None})
        if dt == "bf16" and "fast-layout" not in args.skip:
            out.append({"name": f"ours {dt} fast layout", "impl": "ours", "dtype": dt, "quant": None, "fast": True})
        if "transformers" not in args.skip:
            out.append({"name": f"HF {dt}", "impl": "hf", "dtype": dt, "quant": None})
    if int8:
        dt = "bf16" if "bf16" in args.dtypes else args.dtypes[0]
        out.append({"name": f"ours int8/{dt}", "impl": "ours", "dtype": dt, "quant": "int8"})
    return out


def measure_in_process(vs: list[dict], prep: dict, args) -> dict:
    res = {v["name"]: {"load_s": [], "ttft_first_call_s": [], "ttft_s": [], "decode_tok_s": [], "caption_img_s_b1": [],
                       f"caption_img_s_b{BATCH}": [], "chat_follow_up_ttft_s": [], "chat_first_ttft_s": [],
                       "ids_b1": None} for v in vs}
    b1, b8, pad = prep["inputs"]["b1"], prep["inputs"]["b8"], prep["inputs"]["pad_id"]
    for rep in range(args.reps):
        order = vs if rep % 2 == 0 else vs[::-1]
        for v in order:
            r = res[v["name"]]
            t0 = time.perf_counter()
            obj = load(v["impl"], prep["folder"], v["dtype"], v["quant"], v.get("fast", False))
            r["load_s"].append(time.perf_counter() - t0)
            if rep == 0 and args.reps == 1:  # a warm load exists only from the second one on
                del obj
                release_memory()
                t0 = time.perf_counter()
                obj = load(v["impl"], prep["folder"], v["dtype"], v["quant"], v.get("fast", False))
                r["load_s"].append(time.perf_counter() - t0)
            # Warm-up after every load: the first call also pays for faulting in memory-mapped weights and
            # for one-time kernel setup. It is reported on its own; the figures below are warm.
            w = generate(v["impl"], obj, b1, 2, pad)
            r["ttft_first_call_s"].append(w["ttft_s"])
            g = generate(v["impl"], obj, b1, args.new_tokens, pad)
            r["ttft_s"].append(g["ttft_s"])
            r["decode_tok_s"].append(g["decode_tok_s"])
            r["caption_img_s_b1"].append(1 / g["total_s"])
            if r["ids_b1"] is None:
                r["ids_b1"] = g["ids"][0]
            if "batch" not in args.skip:
                g8 = generate(v["impl"], obj, b8, args.new_tokens, pad)
                r[f"caption_img_s_b{BATCH}"].append(BATCH / g8["total_s"])
            if v["impl"] == "ours" and "chat" not in args.skip:
                c = chat_ttft(obj, prep["images"][0])
                r["chat_first_ttft_s"].append(c["first_s"])
                r["chat_follow_up_ttft_s"].append(c["follow_up_s"])
            log(f"rep {rep + 1}/{args.reps} {v['name']}: load {r['load_s'][-1]:.2f}s ttft {g['ttft_s']:.3f}s "
                f"decode {g['decode_tok_s'] or 0:.1f} tok/s")
            del obj
            release_memory()
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="demo", help="demo, mid, or a preset name (paligemma-3b-224, ...)")
    ap.add_argument("--dtype", default="bf16,fp32", help="comma list of bf16, fp32")
    ap.add_argument("--quantize", default="auto", choices=["auto", "int8", "none"],
                    help="int8 rows for ours (auto: when paligemma_cli.speed.quantize exists)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="default: physical cores available")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--skip", default="", help=f"comma list of {', '.join(SKIPPABLE)}")
    ap.add_argument("--json", dest="json_out", default=None, help="write every figure to this file")
    ap.add_argument("--cache", default=str(DEFAULT_CACHE))
    ap.add_argument("--pool-mib", type=int, default=1024, help="matvec: bytes of weight copies cycled per shape")
    ap.add_argument("--bw-mib", type=int, default=1024, help="bandwidth: size of the summed tensor")
    # internal: the child processes
    ap.add_argument("--child", choices=["rss"], help=argparse.SUPPRESS)
    ap.add_argument("--impl", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--fast-layout", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--inputs", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.threads = args.threads or physical_cores()
    if args.child:
        args.dtypes = args.dtype
        child_rss(args)
        return {}
    args.dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    bad = [d for d in args.dtypes if d not in DTYPE_NAMES]
    if bad or not args.dtypes:
        ap.error(f"--dtype: use bf16 and/or fp32, not {bad}")
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if args.skip - set(SKIPPABLE):
        ap.error(f"--skip: unknown {sorted(args.skip - set(SKIPPABLE))}; known: {', '.join(SKIPPABLE)}")
    if args.reps < 1 or args.new_tokens < 2:
        ap.error("--reps must be >= 1 and --new-tokens >= 2")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch

    torch.set_num_threads(args.threads)
    if "transformers" not in args.skip:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()

    t_run = time.perf_counter()
    report = {
        "command": shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(["bench/speed.py", *argv]),
        "config": args.config, "dtypes": args.dtypes, "reps": args.reps, "new_tokens": args.new_tokens,
        "prompt": PROMPT, "batch": BATCH, "threads": args.threads, "physical_cores": physical_cores(),
        "cpu": cpu_model(), "cpu_flags": cpu_flags(REPORT_FLAGS), "torch": torch.__version__,
        "transformers": package_version("transformers"), "python": platform.python_version(),
        "bf16_native": bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "loadavg_start": os.getloadavg(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine_info(),
        "paths": {"ours": "inference.generate.generate_tokens, eos ignored (eos_id=-1), preallocated KV cache",
                  "hf": "model.generate(min_new_tokens=max_new_tokens=N, do_sample=False), DynamicCache"},
    }
    prep = prepare(args.config, Path(args.cache).expanduser(), "transformers" not in args.skip)
    cfg = prep["cfg"]
    prompt_len = int(prep["inputs"]["b1"]["input_ids"].shape[1])
    report.update(checkpoint=str(prep["folder"]), build=prep["build"], prompt_tokens=prompt_len,
                  params=param_count(cfg), model=cfg.to_dict())
    int8 = "int8" not in args.skip and args.quantize != "none" and int8_available()
    if args.quantize == "int8" and not int8:
        log("int8 asked for, but paligemma_cli.speed.quantize / Pipeline.load(quantize=) is not there: no int8 rows")
    report["int8_rows"] = int8
    vs = variants(args, int8)
    rss = {}  # first, while this process is still small (nothing it allocates can show in a child)
    if "rss" not in args.skip:
        for v in vs:
            log(f"peak RSS: {v['name']} in a fresh process")
            rss[v["name"]] = run_rss_child(Path(__file__), v, prep, args)
    report["rss"] = rss
    if "rooflines" not in args.skip:
        # The int8 kernel's speed is measured whenever int8 is not skipped, even without int8 rows.
        report["rooflines"] = rooflines(cfg, prompt_len, args.dtypes, args.quantize != "none" and "int8" not in args.skip,
                                        args.reps, args.pool_mib, args.bw_mib)
    report["rss_main_after_rooflines_gb"] = rss_gb()
    res = measure_in_process(vs, prep, args)

    starts = {}
    if "process-start" not in args.skip:
        for dt in args.dtypes:
            # `ask` answers once and keeps the mapped weights: the fast-layout variant has no `ask` run.
            group = [v for v in vs if v["dtype"] == dt and (v["quant"] is None or ask_has_quantize())
                     and not v.get("fast")]
            for rep in range(args.reps):
                for v in (group if rep % 2 == 0 else group[::-1]):
                    cmd = process_start_cmd(prep, v, args)
                    log(f"process start rep {rep + 1}/{args.reps}: {v['name']}")
                    tag = v["name"].replace(" ", "-").replace("/", "-")
                    r = first_byte(cmd, child_env(args.threads), prep["work"] / f"stderr-{tag}.txt")
                    if "error" in r:
                        log(f"  failed: {r['error'][-300:]}")
                    starts.setdefault(v["name"], {"cmd": shlex.join(cmd), "runs": []})["runs"].append(r)
    report["process_start"] = starts

    # --- assemble -------------------------------------------------------------------------------------
    out = {}
    for v in vs:
        r = res[v["name"]]
        row = {k: summarize(r[k]) for k in r if k not in ("ids_b1", "load_s")}
        row["load_first_s"] = r["load_s"][0]
        row["load_warm_s"] = summarize(r["load_s"][1:])
        row["impl"], row["dtype"], row["quant"] = v["impl"], v["dtype"], v["quant"]
        row["ids_b1"] = r["ids_b1"]
        if v["name"] in rss:
            row["peak_rss_gb"] = rss[v["name"]].get("peak_gb")
            row["rss_after_load_gb"] = rss[v["name"]].get("rss_after_load_gb")
            row["load_fresh_process_s"] = rss[v["name"]].get("load_s")
        runs = [x["first_byte_s"] for x in starts.get(v["name"], {}).get("runs", []) if "first_byte_s" in x]
        row["process_first_byte_s"] = summarize(runs)
        kind = "int8" if v["quant"] == "int8" else v["dtype"]
        row["weights_gb"] = (param_count(cfg)["total_approx"] * {"bf16": 2, "fp32": 4}[v["dtype"]]) / 1e9
        if "rooflines" in report:
            roof = roofline_times(cfg, report["rooflines"], kind, prompt_len, args.new_tokens)
            row["roofline"] = roof
            row["fraction"] = fractions(row, roof)
        out[v["name"]] = row
    for dt in args.dtypes:  # do the two implementations emit the same greedy tokens?
        a, b = out.get(f"ours {dt}"), out.get(f"HF {dt}")
        if a and b and a["ids_b1"] and b["ids_b1"]:
            same = next((i for i, (x, y) in enumerate(zip(a["ids_b1"], b["ids_b1"])) if x != y), len(a["ids_b1"]))
            note = f"first {same} of {len(a['ids_b1'])} tokens identical"
            if same < len(a["ids_b1"]) and a["ids_b1"][same] == 1:
                note += " (then ours emits eos, which HF's min_new_tokens forbids; same work either way)"
            report.setdefault("greedy_agreement", {})[dt] = note
        fast = out.get(f"ours {dt} fast layout")
        if a and fast and a["ids_b1"] and fast["ids_b1"]:
            same = fast["ids_b1"] == a["ids_b1"]
            report.setdefault("greedy_agreement", {})[f"{dt} fast layout vs ours {dt}"] = (
                "identical" if same else "differ")
    report["results"] = out
    report["loadavg_end"] = os.getloadavg()
    report["run_s"] = time.perf_counter() - t_run
    print_tables(report)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2, default=str) + "\n")
        log(f"wrote {args.json_out}")
    return report


def fractions(row: dict, roof: dict) -> dict:
    """Measured as a fraction of the roofline: rate / roof rate, or roof time / time (1 = at the roof)."""
    f = {}

    def med(key):
        s = row.get(key)
        return s["median"] if s else None

    if med("decode_tok_s"):
        f["decode"] = med("decode_tok_s") / roof["decode_tok_s"]
        if "matvec_ceiling_tok_s" in roof:
            f["decode_vs_matvec"] = med("decode_tok_s") / roof["matvec_ceiling_tok_s"]
    if med("ttft_s") and "ttft_s" in roof:
        f["ttft"] = roof["ttft_s"] / med("ttft_s")
    for b in (1, BATCH):
        if med(f"caption_img_s_b{b}") and f"caption_img_s_b{b}" in roof:
            f[f"caption_b{b}"] = med(f"caption_img_s_b{b}") / roof[f"caption_img_s_b{b}"]
    return f


# --- output ----------------------------------------------------------------------------------------


def fmt(x, digits=3) -> str:
    if x is None:
        return "-"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.{digits}g}" if abs(x) < 1 else f"{x:.2f}"


def cell(s) -> str:
    if s is None:
        return "-"
    if isinstance(s, (int, float)):
        return fmt(s)
    if s["n"] == 1:
        return fmt(s["median"])
    return f"{fmt(s['median'])} ({fmt(s['min'])}–{fmt(s['max'])})"


METRICS = [  # key, label, higher is better
    ("load_first_s", "load, first in run (s)", False),
    ("load_warm_s", "load, warm (s)", False),
    ("load_fresh_process_s", "load, fresh process, imports done (s)", False),
    ("rss_after_load_gb", "RSS after load, fresh process (GB)", False),
    ("peak_rss_gb", "peak RSS after 1 generation, fresh process (GB)", False),
    ("weights_gb", "weights in memory (GB)", False),
    ("ttft_first_call_s", "TTFT b1, first call after load (s)", False),
    ("ttft_s", "TTFT b1: vision+prefill+1st token (s)", False),
    ("decode_tok_s", "decode (tok/s)", True),
    ("caption_img_s_b1", "caption b1 (img/s)", True),
    (f"caption_img_s_b{BATCH}", f"caption b{BATCH} (img/s)", True),
    ("chat_first_ttft_s", "chat 1st question TTFT (s)", False),
    ("chat_follow_up_ttft_s", "chat follow-up TTFT (s)", False),
    ("process_first_byte_s", "process start → 1st stdout byte (s)", False),
]


def print_tables(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, width=max(140, Console().width))
    if "machine" in report:
        console.print(machine_line(report["machine"]))
    res = report["results"]
    names = list(res)
    t = Table(title=f"{report['config']}: median (min–max) of {report['reps']} reps, {report['threads']} threads, "
                    f"{report['new_tokens']} new tokens, prompt {report['prompt_tokens']} tokens",
              title_justify="left")
    t.add_column("metric")
    cols = []
    for n in names:
        cols.append(n)
        t.add_column(n, justify="right")
        hf = n.replace("ours", "HF").removesuffix(" fast layout")
        if n.startswith("ours") and hf in res:
            cols.append(("ratio", n, hf))
            t.add_column(f"ours vs HF {res[n]['dtype']} (×, >1 ours better)", justify="right")
    for key, label, higher in METRICS:
        if all(_med(res[n].get(key)) is None for n in names):
            continue
        row = [label]
        for c in cols:
            if isinstance(c, tuple):
                a, b = _med(res[c[1]].get(key)), _med(res[c[2]].get(key))
                row.append("-" if not a or not b or key == "weights_gb" else f"{(a / b if higher else b / a):.2f}")
            else:
                row.append(cell(res[c].get(key)))
        t.add_row(*row)
    console.print(t)

    roofed = [n for n in names if "roofline" in res[n]]
    if roofed:
        r = Table(title="measured vs roofline (fraction = measured rate ÷ roofline rate, or roofline time ÷ "
                        "measured time; 1.0 = at the roof)", title_justify="left")
        for c in ("variant", "metric", "measured", "roofline", "fraction", "matvec ceiling", "fraction"):
            r.add_column(c, justify="left" if c in ("variant", "metric") else "right")
        for n in roofed:
            roof, frac = res[n]["roofline"], res[n]["fraction"]
            r.add_row(n, "decode (tok/s)", fmt(_med(res[n].get("decode_tok_s"))), fmt(roof["decode_tok_s"]),
                      fmt(frac.get("decode")), fmt(roof.get("matvec_ceiling_tok_s")), fmt(frac.get("decode_vs_matvec")))
            if "ttft_s" in roof:
                r.add_row("", "TTFT b1 (s)", fmt(_med(res[n].get("ttft_s"))), fmt(roof["ttft_s"]), fmt(frac.get("ttft")),
                          "", "")
                for b in (1, BATCH):
                    key = f"caption_img_s_b{b}"
                    if _med(res[n].get(key)) is not None:
                        r.add_row("", f"caption b{b} (img/s)", fmt(_med(res[n][key])), fmt(roof[key]),
                                  fmt(frac.get(f"caption_b{b}")), "", "")
        console.print(r)

    if "rooflines" in report:
        ro = report["rooflines"]
        m = Table(title="machine, measured in this run (medians)", title_justify="left")
        m.add_column("figure")
        m.add_column("value", justify="right")
        bw = ro["bandwidth"]
        m.add_row(f"read bandwidth, sum of {bw['tensor_mib']} MiB fp32 (GB/s)", fmt(bw["sum_gbs"]))
        m.add_row("copy bandwidth, read + write (GB/s)", fmt(bw["copy_gbs"]))
        for kind, mv in ro["matvec"].items():
            if "error" in mv:
                m.add_row(f"{kind} matvec", f"unavailable: {mv['error'][:60]}")
                continue
            m.add_row(f"{kind} matvec over one token's decoder weights (GB/s)", fmt(mv["gbs"]))
            m.add_row(f"{kind} bytes of weights read per token (GB)", fmt(mv["bytes_per_token"] / 1e9))
        for kind, mm in ro["matmul"].items():
            rates = [v["gflops"] for v in mm.values()]
            m.add_row(f"{kind} matmul, prefill shapes (GFLOP/s, min–max over shapes)",
                      f"{fmt(statistics.median(rates))} ({fmt(min(rates))}–{fmt(max(rates))})")
        console.print(m)
    if report.get("greedy_agreement"):
        console.print("greedy tokens ours vs HF (batch 1): " +
                      "; ".join(f"{k}: {v}" for k, v in report["greedy_agreement"].items()))
    console.print(f"[dim]{report['cpu']}, torch {report['torch']}, transformers {report['transformers']}, "
                  f"load average {report['loadavg_start'][0]:.1f} → {report['loadavg_end'][0]:.1f} "
                  f"(> {report['threads']} threads means the figures are contended), run {report['run_s']:.0f}s[/]")


def _med(s):
    if s is None:
        return None
    return s if isinstance(s, (int, float)) else s["median"]


if __name__ == "__main__":
    main()
