"""Linear kernels for decoding on this CPU: every candidate on PaliGemma's decoder shapes, speed and error.

Decoding multiplies one row (or a few) by every decoder weight per token, so a kernel's rate of reading
weights is the decode speed. For each shape this times, in one process and interleaved: float32
`F.linear` on a row-major and on a column-major weight (the layout `use_fast_cpu_layout` gives float32),
bfloat16 `F.linear`, oneDNN's packed float32 and bfloat16 linears, the int8 weight-only kernel `_weight_int8pack_mm` fed
float32 or bfloat16 activations, and dynamically quantized int8 (fbgemm: int8 weights, activations
quantized per call). Each is reported as ms per call, GB/s of weight read, speed against float32
row-major, and its largest error against the float64 product, relative to that product's size.

`--isa avx2` runs the same on this machine with torch's, oneDNN's, MKL's and fbgemm's kernels held to
AVX2 (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS, FBGEMM_ENABLE_INSTRUCTIONS): a
check of the AVX2 code paths, not a measurement of an AVX2 machine (memory bandwidth stays this one's).

    python bench/kernels.py
    python bench/kernels.py --isa avx2 --rows 1,8 --json kernels-avx2.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ISA_ENV = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                    "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}}
# PaliGemma 3B's decoder: (out, in) of q, k|v, o, gate|up, down, and the tied head's 257216 rows.
SHAPES = {"q/o (2048x2048)": (2048, 2048), "mlp up (16384x2048)": (16384, 2048),
          "mlp down (2048x16384)": (2048, 16384), "head (257216x2048)": (257216, 2048)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--isa", choices=["native", *ISA_ENV], default="native")
    ap.add_argument("--rows", default="1,8", help="activation rows per call, comma-separated")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="which of: " + ", ".join(SHAPES))
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--pool-mib", type=int, default=1024, help="weights rotated through this much memory, so "
                    "each call reads them from memory, not cache")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    wanted = ISA_ENV.get(args.isa, {})
    if any(os.environ.get(k) != v for k, v in wanted.items()):  # the ISA is fixed when torch loads
        sys.exit(subprocess.call([sys.executable, *sys.argv], env={**os.environ, **wanted}))
    run(args)


def run(args) -> None:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import machine_info, machine_line

    torch.set_num_threads(args.threads)
    info = machine_info()
    print(machine_line(info), flush=True)
    bf16_native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    results = []
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        copies = max(1, min(16, (args.pool_mib << 20) // (n * k * 4)))
        g = torch.Generator().manual_seed(0)
        weights = [torch.randn(n, k, generator=g) * 0.02 for _ in range(copies)]
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, k, generator=g)
            exact = (x.double() @ weights[0].double().T)
            kernels = candidates(weights, x, bf16_native)
            times = {label: [] for label in kernels}
            errors = {}
            for label, (make, call, nbytes) in kernels.items():
                prepared = make()
                out = call(prepared[0], x)
                errors[label] = float((out.double() - exact).abs().max() / exact.abs().max())
                kernels[label] = (prepared, call, nbytes)
            for _ in range(args.reps):  # interleaved, so a busy moment hits every kernel alike
                for label, (prepared, call, nbytes) in kernels.items():
                    w = prepared[_ % len(prepared)]
                    t0 = time.perf_counter()
                    call(w, x)
                    times[label].append(time.perf_counter() - t0)
            base = statistics.median(times["fp32 row-major"])
            for label, (prepared, call, nbytes) in kernels.items():
                t = statistics.median(times[label])
                row = {"shape": name, "rows": rows, "kernel": label, "ms": 1e3 * t, "gb_per_s": nbytes / t / 1e9,
                       "speed_vs_fp32": base / t, "max_rel_error": errors[label]}
                results.append(row)
                print(f"{name:22s} rows {rows:3d}  {label:30s} {row['ms']:8.3f} ms  {row['gb_per_s']:6.1f} GB/s  "
                      f"{row['speed_vs_fp32']:5.2f}x  err {row['max_rel_error']:.1e}", flush=True)
            del kernels, times
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "isa": args.isa, "results": results}, indent=2) + "\n")


def candidates(weights, x, bf16_native: bool) -> dict:
    """label -> (make the prepared weights, call(prepared, x), bytes of weight read per call)."""
    import torch
    import torch.nn.functional as F

    n, k = weights[0].shape
    out = {
        "fp32 row-major": (lambda: weights, lambda w, x: F.linear(x, w), n * k * 4),
        "fp32 column-major": (lambda: [w.t().contiguous().t() for w in weights], lambda w, x: F.linear(x, w), n * k * 4),
    }
    out["bf16 row-major"] = (lambda: [w.bfloat16() for w in weights],
                             lambda w, x: F.linear(x.bfloat16(), w).float(), n * k * 2)
    if torch.backends.mkldnn.is_available():
        out["fp32 oneDNN packed"] = (
            lambda: [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in weights],
            lambda w, x: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""), n * k * 4)
        if bf16_native:
            out["bf16 oneDNN packed"] = (
                lambda: [torch.ops.mkldnn._reorder_linear_weight(w.bfloat16(), 1) for w in weights],
                lambda w, x: torch.ops.mkldnn._linear_pointwise(x.bfloat16(), w, None, "none", [], "").float(),
                n * k * 2)

    def int8(w):
        scales = w.abs().amax(1) / 127
        return (w / scales[:, None]).round().to(torch.int8).contiguous(), scales

    out["int8 pack_mm, fp32 acts"] = (lambda: [int8(w) for w in weights],
                                      lambda w, x: torch.ops.aten._weight_int8pack_mm(x, w[0], w[1]), n * k)
    if k % 16 == 0:
        out["int8 pack_mm, bf16 acts"] = (
            lambda: [(q, s.bfloat16()) for q, s in (int8(w) for w in weights)],
            lambda w, x: torch.ops.aten._weight_int8pack_mm(x.bfloat16(), w[0], w[1]).float(), n * k)
    if "fbgemm" in torch.backends.quantized.supported_engines:
        def dynamic(w):
            torch.backends.quantized.engine = "fbgemm"
            scales = (w.abs().amax(1) / 127).double()
            q = torch.quantize_per_channel(w, scales, torch.zeros(n, dtype=torch.long), 0, torch.qint8)
            return torch.ops.quantized.linear_prepack(q, None)

        out["int8 dynamic (fbgemm)"] = (lambda: [dynamic(w) for w in weights],
                                        lambda w, x: torch.ops.quantized.linear_dynamic(x, w, True), n * k)
    return out


if __name__ == "__main__":
    main()
