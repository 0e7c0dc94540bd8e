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
  ours: `core.generate.generate_tokens` (what `Pipeline.stream`/`generate` run) with eos_id=-1, so it
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
Prints numbers only; not a test.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import math
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEMO_FOLDER = ROOT / "paligemma_cli" / "demo" / "model"
CONFIGS = {  # name -> (preset, overrides); any other preset name of core/config.py works too
    "mid": ("paligemma-3b-224", {"text__num_hidden_layers": 2, "vision__num_hidden_layers": 3}),
}
PROMPT = "caption en"
FOLLOW_UP = "answer en what is in the image?"
BATCH = 8
DTYPE_NAMES = {"bf16": "bfloat16", "fp32": "float32"}
SKIPPABLE = ("transformers", "rss", "process-start", "chat", "batch", "rooflines", "int8", "fast-layout")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- machine ---------------------------------------------------------------------------------------


def physical_cores() -> int:
    """Distinct (package, core) pairs among the CPUs this process may run on."""
    cpus = os.sched_getaffinity(0)
    cores = set()
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add((topo.joinpath("physical_package_id").read_text().strip(),
                       topo.joinpath("core_id").read_text().strip()))
        except OSError:
            cores.add(("?", str(cpu)))
    return max(1, len(cores))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return sorted(f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16",
                                          "amx_int8", "avx_vnni") if f in have)
    except OSError:
        pass
    return []


def maxrss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux


def vm_hwm_gb() -> float:
    """Peak RSS of this process's address space (VmHWM). Unlike `ru_maxrss`, which Linux carries across
    exec (a child forked from a big parent starts with the parent's figure), it counts only this image."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return maxrss_gb()


def rss_gb() -> float:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9
    except OSError:
        return float("nan")


def release_memory() -> None:
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


# --- model shapes ----------------------------------------------------------------------------------


def model_config(name: str):
    from paligemma_cli.model.config import PaliGemmaConfig

    if name == "demo":
        return PaliGemmaConfig.from_json(DEMO_FOLDER / "config.json")
    preset, overrides = CONFIGS.get(name, (name, {}))
    return PaliGemmaConfig.from_name(preset, **overrides)


def linear_shapes(cfg) -> dict:
    """(N, K) of every weight matrix, grouped: per text layer, per vision layer, head, projector."""
    t, v = cfg.text, cfg.vision
    q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    D, F = t.hidden_size, t.intermediate_size
    return {
        "text_layer": {"q_proj": (q, D), "k_proj": (kv, D), "v_proj": (kv, D), "o_proj": (D, q),
                       "gate_proj": (F, D), "up_proj": (F, D), "down_proj": (D, F)},
        "text_layers": t.num_hidden_layers,
        "head": (t.vocab_size, D),
        "vision_layer": {"q_proj": (v.hidden_size,) * 2, "k_proj": (v.hidden_size,) * 2,
                         "v_proj": (v.hidden_size,) * 2, "out_proj": (v.hidden_size,) * 2,
                         "fc1": (v.intermediate_size, v.hidden_size), "fc2": (v.hidden_size, v.intermediate_size)},
        "vision_layers": v.num_hidden_layers,
        "patch_embed": (v.hidden_size, v.num_channels * v.patch_size**2),
        "projector": (D, v.hidden_size),
    }


def decode_weight_counts(shapes: dict) -> dict:
    """{(N, K): how many such matrices one decode step reads}, the head counted once."""
    counts: dict = {}
    for nk in shapes["text_layer"].values():
        counts[nk] = counts.get(nk, 0) + shapes["text_layers"]
    counts[shapes["head"]] = counts.get(shapes["head"], 0) + 1
    return counts


def decode_bytes(shapes: dict, bytes_per_weight: float) -> float:
    return sum(n * k * c for (n, k), c in decode_weight_counts(shapes).items()) * bytes_per_weight


def param_count(cfg) -> dict:
    s = linear_shapes(cfg)
    text = sum(n * k for n, k in s["text_layer"].values()) * s["text_layers"]
    vision = sum(n * k for n, k in s["vision_layer"].values()) * s["vision_layers"]
    embed = s["head"][0] * s["head"][1]
    return {"embedding": embed, "decoder_linears": text, "vision_linears": vision,
            "total_approx": embed + text + vision + s["projector"][0] * s["projector"][1]
            + cfg.vision.num_patches * cfg.vision.hidden_size}


# --- rooflines -------------------------------------------------------------------------------------


def timed(fn, reps: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def read_bandwidth(mib: int = 1024, reps: int = 7) -> dict:
    """GB/s of `.sum()` (reads only) and `.copy_` (reads + writes) over a tensor of `mib` MiB."""
    import torch

    n = mib * 2**20 // 4
    a = torch.full((n,), 0.5, dtype=torch.float32)
    t_sum = timed(lambda: a.sum(), reps)
    b = torch.empty_like(a)
    t_copy = timed(lambda: b.copy_(a), reps)
    del a, b
    release_memory()
    nbytes = n * 4
    return {"tensor_mib": mib, "reps": reps, "sum_gbs": nbytes / statistics.median(t_sum) / 1e9,
            "sum_gbs_all": [nbytes / t / 1e9 for t in t_sum],
            "copy_gbs": 2 * nbytes / statistics.median(t_copy) / 1e9}


def matvec_speed(shapes_counts: dict, kind: str, pool_mib: int, reps: int) -> dict:
    """Per (N, K): seconds of one x[1,K] @ W[N,K]^T with W streamed from memory, and GB/s.

    kind: "bf16", "fp32" (F.linear) or "int8" (`aten._weight_int8pack_mm`, bf16 activations).
    Each timing cycles over enough copies of W to exceed `pool_mib`, so no call finds W in cache.
    """
    import torch
    import torch.nn.functional as F

    per_shape, err = {}, None
    for (n, k) in shapes_counts:
        if kind == "int8":
            elem = 1
            ws = None
        else:
            dt = torch.bfloat16 if kind == "bf16" else torch.float32
            elem = 2 if kind == "bf16" else 4
        copies = max(1, math.ceil(pool_mib * 2**20 / (n * k * elem)))
        try:
            if kind == "int8":
                x = torch.full((1, k), 0.01, dtype=torch.bfloat16)
                ws = [torch.ones((n, k), dtype=torch.int8) for _ in range(copies)]
                scales = torch.full((n,), 0.01, dtype=torch.bfloat16)
                op = torch.ops.aten._weight_int8pack_mm
                run = lambda: [op(x, w, scales) for w in ws]  # noqa: E731
            else:
                x = torch.full((1, k), 0.01, dtype=dt)
                ws = [torch.full((n, k), 0.01, dtype=dt) for _ in range(copies)]
                run = lambda: [F.linear(x, w) for w in ws]  # noqa: E731
            ts = [t / copies for t in timed(run, reps)]
        except (RuntimeError, AttributeError) as e:
            err = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            break
        finally:
            ws = None
            release_memory()
        t = statistics.median(ts)
        per_shape[f"{n}x{k}"] = {"s": t, "gbs": n * k * elem / t / 1e9, "copies": copies}
    if err:
        return {"error": err}
    t_token = sum(per_shape[f"{n}x{k}"]["s"] * c for (n, k), c in shapes_counts.items())
    nbytes = sum(n * k * c for (n, k), c in shapes_counts.items()) * (1 if kind == "int8" else elem)
    return {"per_shape": per_shape, "token_s": t_token, "gbs": nbytes / t_token / 1e9, "bytes_per_token": nbytes}


def matmul_speed(shape_rows: dict, kind: str, reps: int) -> dict:
    """Per ((N, K), M): FLOP/s of x[M,K] @ W[N,K]^T (prefill-like: compute bound, W stays cached)."""
    import torch
    import torch.nn.functional as F

    dt = torch.bfloat16 if kind == "bf16" else torch.float32
    out = {}
    for (n, k), m in shape_rows:
        x = torch.full((m, k), 0.01, dtype=dt)
        w = torch.full((n, k), 0.01, dtype=dt)
        t = statistics.median(timed(lambda: F.linear(x, w), reps))
        out[f"{m}x{k}->{n}"] = {"s": t, "gflops": 2 * m * n * k / t / 1e9}
        del x, w
    release_memory()
    return out


def prefill_flops(cfg, prompt_len: int, batch: int) -> dict:
    """The matmul work any implementation must do for one prefill of `batch` images.

    linears: {((N, K), M): count} of x[M,K] @ W[N,K]^T per image (vision tower, projector, decoder).
    The last decoder layer needs keys and values of every position (they go to the cache) but its query,
    attention output and MLP only for the last position, so those weights appear in `last_token`
    ({(N, K): count}, one row per image, read once per batch), as does the tied head (last slot only).
    """
    s = linear_shapes(cfg)
    t, v = cfg.text, cfg.vision
    tv, T, L = v.num_patches, prompt_len, s["text_layers"]
    linears: dict = {}

    def add(nk, m, c):
        linears[(nk, m)] = linears.get((nk, m), 0) + c

    for nk in s["vision_layer"].values():
        add(nk, tv, s["vision_layers"])
    add(s["patch_embed"], tv, 1)
    add(s["projector"], tv, 1)
    last_token = {}
    for name, nk in s["text_layer"].items():
        full = name in ("k_proj", "v_proj")
        add(nk, T, L if full else L - 1)
        if not full:
            last_token[nk] = last_token.get(nk, 0) + 1
    last_token[s["head"]] = last_token.get(s["head"], 0) + 1
    hq = t.num_attention_heads * t.head_dim
    attn = (s["vision_layers"] * 4 * tv * tv * v.hidden_size + (L - 1) * 4 * T * T * hq + 4 * T * hq)
    total = batch * (sum(2 * n * k * m * c for ((n, k), m), c in linears.items()) + attn
                     + sum(2 * n * k * c for (n, k), c in last_token.items()))
    return {"linears": linears, "last_token": last_token, "attention_flops": batch * attn, "batch": batch,
            "total_flops": total}


def rooflines(cfg, prompt_len: int, dtypes: list[str], want_int8: bool, reps: int, pool_mib: int,
              bw_mib: int) -> dict:
    shapes = linear_shapes(cfg)
    counts = decode_weight_counts(shapes)
    log("roofline: memory bandwidth")
    out = {"bandwidth": read_bandwidth(bw_mib, max(reps, 5)), "matvec": {}, "matmul": {}}
    for kind in dtypes + (["int8"] if want_int8 else []):
        log(f"roofline: {kind} matvec on {len(counts)} decoder shapes (pool {pool_mib} MiB)")
        out["matvec"][kind] = matvec_speed(counts, kind, pool_mib, max(reps, 3))
    flops = prefill_flops(cfg, prompt_len, 1)
    rows = sorted(flops["linears"])
    for kind in dtypes:
        log(f"roofline: {kind} matmul on {len(rows)} prefill shapes")
        out["matmul"][kind] = matmul_speed(rows, kind, max(reps, 3))
    return out


def roofline_times(cfg, roof: dict, kind: str, prompt_len: int, new_tokens: int) -> dict:
    """Lower bounds in seconds / upper bounds in rates for one dtype ("bf16", "fp32", "int8")."""
    shapes = linear_shapes(cfg)
    bw = roof["bandwidth"]["sum_gbs"] * 1e9
    elem = {"bf16": 2, "fp32": 4, "int8": 1}[kind]
    step_bytes = decode_bytes(shapes, elem)
    out = {"decode_bytes_per_token": step_bytes, "decode_tok_s": bw / step_bytes}
    mv = roof["matvec"].get(kind, {})
    if "token_s" in mv:
        out["matvec_ceiling_tok_s"] = 1 / mv["token_s"]
    mm = roof["matmul"].get("bf16" if kind == "int8" else kind)  # int8 prefill: assume bf16 matmuls
    if not mm:
        return out
    rate_med = statistics.median(r["gflops"] for r in mm.values()) * 1e9
    for batch in (1, BATCH):
        f = prefill_flops(cfg, prompt_len, batch)
        # Many-row matmuls at the FLOP/s measured for their shape; attention at the median rate; the
        # last-token weights (B rows) at whichever bound is slower: streaming them once, or their FLOPs.
        t = sum(batch * 2 * n * k * m * c / (mm[f"{m}x{k}->{n}"]["gflops"] * 1e9)
                for ((n, k), m), c in f["linears"].items())
        t += f["attention_flops"] / rate_med
        t += sum(c * max(n * k * elem / bw, batch * 2 * n * k / rate_med) for (n, k), c in f["last_token"].items())
        step_t = step_bytes / bw
        out[f"prefill_s_b{batch}"] = t
        out[f"prefill_flops_b{batch}"] = f["total_flops"]
        out[f"caption_img_s_b{batch}"] = batch / (t + (new_tokens - 1) * step_t)
    out["ttft_s"] = out["prefill_s_b1"]
    return out


# --- checkpoint ------------------------------------------------------------------------------------


def make_images(n: int, seed: int = 0):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        # Smooth random colour fields (not white noise), 300x260 so that every resize path runs.
        small = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
        out.append(Image.fromarray(small).resize((300, 260), Image.Resampling.BICUBIC))
    return out


def build_random_checkpoint(cfg_name: str, folder: Path) -> dict:
    """Write a random bf16 checkpoint of `cfg_name` with transformers' save_pretrained (built on meta)."""
    import torch
    import transformers
    from transformers import PaliGemmaForConditionalGeneration

    from paligemma_cli.processing.tokenizer import PaliGemmaTokenizer
    from tests.tokenizer_fixture import make_tiny_tokenizer

    t_start = time.perf_counter()
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok = PaliGemmaTokenizer.from_file(make_tiny_tokenizer(tmp))
    preset, overrides = CONFIGS.get(cfg_name, (cfg_name, {}))
    from paligemma_cli.model.config import PaliGemmaConfig

    cfg = PaliGemmaConfig.from_name(preset, **overrides, image_token_id=tok.image_token_id)
    hf_cfg = transformers.PaliGemmaConfig.from_dict(cfg.to_dict())
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = PaliGemmaForConditionalGeneration(hf_cfg)
    finally:
        torch.set_default_dtype(prev)
    model = model.to(torch.bfloat16).to_empty(device="cpu")
    model.tie_weights()
    t_fill = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # SigLIP LayerNorm scales 1; Gemma RMSNorm (1 + w) scales and biases 0
                p.fill_(1.0 if "vision" in name and "norm" in name and name.endswith("weight") else 0.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
        emb = model.get_input_embeddings().weight
        emb[:4] = 0  # pad, eos, bos, unk never win the argmax ...
        emb[tok.image_token_id:] = 0  # ... nor ids the tiny tokenizer lacks: the answer is printable text
    fill_s = time.perf_counter() - t_fill
    model.save_pretrained(tmp, max_shard_size="5GB")
    del model
    release_memory()
    info = {"config": cfg_name, "preset": preset, "overrides": overrides, "image_token_id": tok.image_token_id,
            "tokenizer_pieces": tok.image_token_id, "fill_s": round(fill_s, 1),
            "build_s": round(time.perf_counter() - t_start, 1), "build_peak_rss_gb": round(vm_hwm_gb(), 2),
            "transformers": transformers.__version__}
    (tmp / "bench_build.json").write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return info


def build_hf_processor(tokenizer_folder: Path, out: Path, image_size: int, num_image_tokens: int) -> None:
    """transformers' PaliGemmaProcessor for the checkpoint's tokenizer, saved for `AutoProcessor`."""
    import transformers

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copy(tokenizer_folder / "tokenizer.model", tmp / "tokenizer.model")
    tok = transformers.AutoTokenizer.from_pretrained(tmp, tokenizer_type="gemma")
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    ip = transformers.SiglipImageProcessor(
        do_resize=True, size={"height": image_size, "width": image_size}, resample=3, image_mean=[0.5] * 3,
        image_std=[0.5] * 3, do_rescale=True, rescale_factor=1 / 255)
    ip.image_seq_length = num_image_tokens
    transformers.PaliGemmaProcessor(image_processor=ip, tokenizer=tok).save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def prepare(cfg_name: str, cache: Path, need_hf: bool) -> dict:
    """The checkpoint folder, inputs file and image for `cfg_name`, built once into `cache`."""
    import torch

    from paligemma_cli.model.config import PaliGemmaConfig
    from paligemma_cli.processing.processor import PaliGemmaProcessor
    from paligemma_cli.processing.tokenizer import PaliGemmaTokenizer

    if cfg_name == "demo":
        work = cache / "demo"
        folder = DEMO_FOLDER
        build = {"config": "demo", "folder": str(DEMO_FOLDER), "note": "the shipped demo model"}
    else:
        work = cache / f"{cfg_name}-bf16"
        folder = work
        if not (work / "bench_build.json").exists():
            log(f"building a random {cfg_name} checkpoint in {work} (once)")
            build = build_random_checkpoint(cfg_name, work)
            log(f"built in {build['build_s']}s (fill {build['fill_s']}s), peak RSS {build['build_peak_rss_gb']} GB")
        build = json.loads((work / "bench_build.json").read_text())
    work.mkdir(parents=True, exist_ok=True)
    cfg = PaliGemmaConfig.from_json(folder / "config.json")
    tok = PaliGemmaTokenizer.from_folder(folder)
    proc = PaliGemmaProcessor(tok, cfg.image_size, cfg.num_image_tokens)
    images = make_images(BATCH)
    image_file = work / "image0.png"
    images[0].save(image_file)
    inputs = {"b1": proc([PROMPT], images=images[:1], padding_side="left"),
              "b8": proc([PROMPT] * BATCH, images=images, padding_side="left"),
              "pad_id": tok.pad_id, "prompt": PROMPT}
    inputs_file = work / "inputs.pt"
    torch.save(inputs, inputs_file)
    hf_proc = work / "hf_processor"
    if need_hf and not (hf_proc / "processor_config.json").exists() and not (hf_proc / "preprocessor_config.json").exists():
        log("saving transformers' processor for the plain-transformers script")
        build_hf_processor(folder, hf_proc, cfg.image_size, cfg.num_image_tokens)
    script = work / "hf_first_answer.py"
    script.write_text(HF_FIRST_ANSWER)
    return {"folder": folder, "work": work, "cfg": cfg, "inputs": inputs, "inputs_file": inputs_file,
            "image_file": image_file, "hf_processor": hf_proc, "hf_script": script, "build": build,
            "images": images}


HF_FIRST_ANSWER = '''"""Plain transformers: load, process, generate with a streamer that prints every token at once."""
import sys

import torch
from PIL import Image
from transformers import AutoProcessor, PaliGemmaForConditionalGeneration
from transformers.generation.streamers import BaseStreamer

folder, processor_folder, image, prompt, max_new_tokens, dtype = sys.argv[1:7]
model = PaliGemmaForConditionalGeneration.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
processor = AutoProcessor.from_pretrained(processor_folder)
inputs = processor(images=Image.open(image).convert("RGB"), text="<image>" + prompt, return_tensors="pt")
inputs = inputs.to(model.dtype)  # floating point tensors only


class PrintEachToken(BaseStreamer):
    """TextStreamer holds text back until a word ends; this prints each token's text immediately."""

    def __init__(self):
        self.prompt_seen = False

    def put(self, value):
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        sys.stdout.write(processor.decode(value.reshape(-1).tolist(), skip_special_tokens=True))
        sys.stdout.flush()

    def end(self):
        sys.stdout.write("\\n")
        sys.stdout.flush()


with torch.inference_mode():
    model.generate(**inputs, max_new_tokens=int(max_new_tokens), do_sample=False, streamer=PrintEachToken())
'''


# --- the two implementations ------------------------------------------------------------------------


def int8_available() -> bool:
    try:
        import importlib

        importlib.import_module("paligemma_cli.speed.quantize")
    except ImportError:
        return False
    from paligemma_cli.inference.pipeline import Pipeline

    return "quantize" in inspect.signature(Pipeline.load).parameters


def load(impl: str, folder: Path, dtype: str, quant: str | None, fast: bool = False):
    import torch

    if impl == "ours":
        from paligemma_cli.inference.pipeline import Pipeline

        if fast:  # what chat, caption of a folder and eval load (`fast_layout`)
            return Pipeline.load(folder, "cpu", dtype, quantize=quant, fast_layout=True)
        if quant:
            return Pipeline.load(folder, "cpu", dtype, quantize=quant)
        return Pipeline.load(folder, "cpu", dtype)
    from transformers import PaliGemmaForConditionalGeneration

    return PaliGemmaForConditionalGeneration.from_pretrained(folder, dtype=getattr(torch, DTYPE_NAMES[dtype])).eval()


def generate(impl: str, obj, batch: dict, new_tokens: int, pad_id: int) -> dict:
    """Exactly `new_tokens` greedy tokens; returns t_first (s, batch 1 only), total (s) and the ids."""
    import torch

    t0 = time.perf_counter()
    if impl == "ours":
        from paligemma_cli.inference.generate import SamplingOptions, generate_tokens

        first, steps = None, []
        for token in generate_tokens(obj.model, batch, SamplingOptions(max_new_tokens=new_tokens), -1, pad_id):
            if first is None:
                first = time.perf_counter()
            steps.append(token)
        total = time.perf_counter() - t0
        ids = torch.stack(steps, 1)
    else:
        from transformers.generation.streamers import BaseStreamer

        class Times(BaseStreamer):
            def __init__(self):
                self.t = []

            def put(self, value):
                self.t.append(time.perf_counter())

            def end(self):
                pass

        streamer = Times() if batch["input_ids"].shape[0] == 1 else None
        with torch.inference_mode():
            out = obj.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               token_type_ids=batch["token_type_ids"],
                               pixel_values=batch["pixel_values"].to(obj.dtype), max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, do_sample=False, streamer=streamer, pad_token_id=pad_id,
                               eos_token_id=1)
        total = time.perf_counter() - t0
        first = streamer.t[1] if streamer and len(streamer.t) > 1 else None  # t[0] is the prompt
        ids = out[:, batch["input_ids"].shape[1]:]
    ttft = first - t0 if first is not None else None
    decode = (new_tokens - 1) / (total - ttft) if ttft is not None and new_tokens > 1 else None
    return {"ttft_s": ttft, "total_s": total, "decode_tok_s": decode, "ids": ids.tolist()}


def chat_ttft(pipe, image) -> dict:
    from paligemma_cli.inference.chat_session import ChatSession
    from paligemma_cli.inference.generate import SamplingOptions

    chat = ChatSession(pipe, SamplingOptions(max_new_tokens=1))
    chat.set_image(image)
    list(chat.ask(PROMPT))
    first = chat.last.ttft_s
    list(chat.ask(FOLLOW_UP))
    return {"first_s": first, "follow_up_s": chat.last.ttft_s}


# --- child processes -------------------------------------------------------------------------------


def child_rss(a) -> None:
    """Load + one batch-1 generation in this fresh process; print peak RSS as one JSON line."""
    import torch

    torch.set_num_threads(a.threads)
    # Modules are imported before the clock starts, for both: load_s here is the load itself.
    if a.impl == "hf":
        import transformers  # noqa: F401
        from transformers import PaliGemmaForConditionalGeneration  # noqa: F401
    else:
        import sentencepiece  # noqa: F401

        import paligemma_cli.checkpoints.hf  # noqa: F401
        import paligemma_cli.model.paligemma  # noqa: F401
        from paligemma_cli.inference.pipeline import Pipeline  # noqa: F401
    base = vm_hwm_gb()
    inputs = torch.load(a.inputs, weights_only=False)
    t0 = time.perf_counter()
    obj = load(a.impl, Path(a.folder), a.dtypes, a.quantize if a.quantize != "none" else None, a.fast_layout)
    load_s = time.perf_counter() - t0
    after_load = rss_gb()
    peak_load = vm_hwm_gb()
    generate(a.impl, obj, inputs["b1"], a.new_tokens, inputs["pad_id"])
    print(json.dumps({"baseline_after_imports_gb": base, "rss_after_load_gb": after_load,
                      "peak_after_load_gb": peak_load, "peak_gb": vm_hwm_gb(), "load_s": load_s,
                      "ru_maxrss_gb": maxrss_gb()}))


def run_rss_child(variant: dict, prep: dict, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "rss", "--impl", variant["impl"],
           "--dtype", variant["dtype"], "--quantize", variant["quant"] or "none", "--folder", str(prep["folder"]),
           *(["--fast-layout"] if variant.get("fast") else []),
           "--inputs", str(prep["inputs_file"]), "--new-tokens", str(args.new_tokens), "--threads", str(args.threads)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=child_env(args.threads))
    if p.returncode != 0:
        return {"error": p.stderr.strip()[-800:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def child_env(threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def first_byte(cmd: list[str], env: dict, log_file: Path) -> dict:
    """Seconds from launching `cmd` to its first byte on stdout; the process is then stopped."""
    with open(log_file, "wb") as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env)
        b = os.read(p.stdout.fileno(), 1)
        t_first = time.perf_counter() - t0
        if b:
            p.kill()  # the rest of the answer is not measured here (decode speed is, in-process)
        p.stdout.close()
        rc = p.wait()
    if not b:
        return {"error": f"no output, exit {rc}: " + log_file.read_text(errors="replace")[-600:]}
    return {"first_byte_s": t_first, "first_byte": b.decode(errors="replace")}


def ask_has_quantize() -> bool:
    try:
        from paligemma_cli.commands.ask import ask
    except ImportError:
        return False
    return "quantize" in inspect.signature(ask).parameters


def process_start_cmd(prep: dict, v: dict, args) -> list[str]:
    """`paligemma ask` (the installed entry point) or the plain transformers script, for one variant."""
    if v["impl"] == "hf":
        return [sys.executable, str(prep["hf_script"]), str(prep["folder"]), str(prep["hf_processor"]),
                str(prep["image_file"]), PROMPT, str(args.new_tokens), DTYPE_NAMES[v["dtype"]]]
    exe = Path(sys.executable).with_name("paligemma")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "paligemma_cli"]
    cmd += ["ask", str(prep["image_file"]), "--prompt", PROMPT, "--model", str(prep["folder"]), "--max-tokens",
            str(args.new_tokens), "--device", "cpu", "--dtype", v["dtype"]]
    return cmd + (["--quantize", v["quant"]] if v["quant"] else [])


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


def summarize(values: list) -> dict | None:
    xs = [x for x in values if x is not None]
    if not xs:
        return None
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs), "values": xs}


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
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "paligemma-bench"))
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
        "cpu": cpu_model(), "cpu_flags": cpu_flags(), "torch": torch.__version__,
        "transformers": package_version("transformers"), "python": platform.python_version(),
        "bf16_native": bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "loadavg_start": os.getloadavg(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "paths": {"ours": "core.generate.generate_tokens, eos ignored (eos_id=-1), preallocated KV cache",
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
            rss[v["name"]] = run_rss_child(v, prep, args)
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
