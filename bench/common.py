"""Shared helpers of the benchmark scripts in bench/ (none of them is a benchmark itself).

  machine       `machine_info()` (CPU model, the speed-relevant CPU flags, torch's CPU capability, physical
                cores, torch version, ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA) recorded by every benchmark;
                physical cores, RSS / VmHWM, `release_memory`, package versions
  timing        `timed`, `median`, `summarize`
  model shapes  a config by name (`demo` = the shipped demo model), linear shapes, parameter counts
  rooflines     read bandwidth, matrix-vector GB/s on decoder shapes, matmul FLOP/s on prefill shapes,
                the prefill FLOPs, and the roofline times and rates they give
  checkpoints   input images, random checkpoints (transformers' layout for `speed.py`, this project's for
                `lora_memory.py`, a random demo-64 pipeline for `chat_ttft.py`), `prepare` (checkpoint,
                inputs and image of a config, built once into the cache)
  generation    `load` / `generate` of ours (`Pipeline`, `generate_tokens`) and of transformers on the same
                inputs, a chat session's TTFT
  children      peak RSS of a fresh process (`child_rss` / `run_rss_child`), time to the first byte on
                stdout of a launched command (`first_byte`), the `paligemma ask` / plain-transformers
                command lines

The scripts import it as `common` (bench/ is the first entry of `sys.path` when one of them runs);
tests/bench loads it from its file.
"""

from __future__ import annotations

import gc
import inspect
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `tests.fixtures` (the tiny tokenizer) and this checkout's package
    sys.path.insert(0, str(ROOT))

from paligemma_cli.machine import SPEED_FLAGS, cpu_flags, cpu_model, physical_cores  # noqa: E402
from paligemma_cli.settings import DEMO_MODEL  # noqa: E402

DEMO_FOLDER = DEMO_MODEL
DEFAULT_CACHE = Path.home() / ".cache" / "paligemma-bench"
CONFIGS = {  # name -> (preset, overrides); any other preset name of model/config.py works too
    "mid": ("paligemma-3b-224", {"text__num_hidden_layers": 2, "vision__num_hidden_layers": 3}),
}
PROMPT = "caption en"
FOLLOW_UP = "answer en what is in the image?"
BATCH = 8
DTYPE_NAMES = {"bf16": "bfloat16", "fp32": "float32"}
# The CPU features that decide which kernels run: AVX2/FMA (the float baseline), AVX-512 and its bf16 and
# VNNI (int8) extensions, AVX-VNNI, and AMX tiles (bf16 and int8 matmuls on Sapphire Rapids and later).
# Flags of the `cpu_flags` key that speed.py wrote before `machine_info` existed (kept for comparability).
REPORT_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "avx_vnni")
ISA_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "FBGEMM_ENABLE_INSTRUCTIONS")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- machine ---------------------------------------------------------------------------------------


def machine_info() -> dict:
    """Which CPU class produced a result: model, speed flags, the kernels torch picked, cores, torch."""
    import torch

    return {
        "cpu": cpu_model(), "cpu_flags": cpu_flags(SPEED_FLAGS),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "physical_cores": physical_cores(), "logical_cpus": len(os.sched_getaffinity(0)),
        "torch": torch.__version__, "env": {name: os.environ.get(name) for name in ISA_ENV},
    }


def machine_line(info: dict) -> str:
    """`machine_info()` in one line, for the header of a benchmark's printed output."""
    env = ", ".join(f"{k}={v}" for k, v in info["env"].items() if v is not None) or "no ISA override"
    return (f"machine: {info['cpu']}; {info['physical_cores']} physical cores ({info['logical_cpus']} CPUs); "
            f"torch {info['torch']} kernels {info['torch_cpu_capability']}; "
            f"flags {' '.join(info['cpu_flags']) or '-'}; {env}")


def set_threads(threads: int | None) -> int:
    """torch's intra-op threads: `threads`, else one per physical core available. Returns the number."""
    import torch

    threads = threads or physical_cores()
    torch.set_num_threads(threads)
    return threads


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


# --- timing ----------------------------------------------------------------------------------------


def timed(fn, reps: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(values: list) -> dict | None:
    xs = [x for x in values if x is not None]
    if not xs:
        return None
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs), "values": xs}


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


def read_bandwidth(mib: int = 1024, reps: int = 7) -> dict:
    """GB/s of `.sum()` (reads only) and `.copy_` (reads + writes) over a tensor of `mib` MiB."""
    import torch

    n = mib * 2**20 // 4
    a = torch.full((n,), 0.5, dtype=torch.float32)
    t_sum = timed(lambda: a.sum(), reps)
    b = torch.empty_like(a)
    t_copy = timed(lambda: b.copy_(a), reps)
    a = b = None  # freed (not `del`: the lambdas above close over them)
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
        x = w = None  # freed (not `del`: the lambda above closes over them)
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


# --- checkpoints and inputs ------------------------------------------------------------------------


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

    from paligemma_cli.model.config import PaliGemmaConfig
    from paligemma_cli.processing.tokenizer import PaliGemmaTokenizer
    from tests.fixtures.tokenizer import make_tiny_tokenizer

    t_start = time.perf_counter()
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok = PaliGemmaTokenizer.from_file(make_tiny_tokenizer(tmp))
    preset, overrides = CONFIGS.get(cfg_name, (cfg_name, {}))
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


def random_demo_pipeline(device: str, image_size: int | None = None):
    """A random model of the `demo-64` shape with the tiny test tokenizer (no trained model needed)."""
    import tempfile

    import torch

    from paligemma_cli.inference.pipeline import Pipeline
    from paligemma_cli.model.config import PaliGemmaConfig
    from paligemma_cli.model.paligemma import PaliGemma
    from paligemma_cli.processing.processor import PaliGemmaProcessor
    from paligemma_cli.processing.tokenizer import PaliGemmaTokenizer
    from tests.fixtures.tokenizer import make_tiny_tokenizer

    folder = Path(tempfile.mkdtemp())
    tok = PaliGemmaTokenizer.from_file(make_tiny_tokenizer(folder))
    cfg = PaliGemmaConfig.from_name("demo-64", image_token_id=tok.image_token_id)
    if image_size:
        cfg.vision.image_size = image_size
    torch.manual_seed(0)
    model = PaliGemma(cfg).to(device).eval()
    return Pipeline(model, tok, PaliGemmaProcessor(tok, cfg.image_size, cfg.num_image_tokens), folder)


def load_pipeline(model: str, device: str, dtype: str, image_size: int | None = None) -> tuple:
    """(`Pipeline`, description) of "demo" (the shipped demo model), a checkpoint folder, or anything else:
    `random_demo_pipeline`."""
    from paligemma_cli.inference.pipeline import Pipeline

    if model == "demo":
        return Pipeline.load(DEMO_MODEL, device, dtype), f"built-in demo model ({DEMO_MODEL})"
    if model != "none" and Path(model).is_dir():
        return Pipeline.load(model, device, dtype), model
    return random_demo_pipeline(device, image_size), "random demo-64"


def write_lora_checkpoint(config_name: str, work: Path) -> Path:
    """`work/<config>`: a random checkpoint of a published config (or a `CONFIGS` name) written by `save_model`
    (bf16, as the hub's v2 files, 2 GB shards), and `work/data`: 16 shapes examples at its resolution. Built
    once."""
    import torch

    from paligemma_cli.checkpoints.hf import save_model
    from paligemma_cli.data.shapes import write_dataset
    from paligemma_cli.model.paligemma import PaliGemma
    from paligemma_cli.processing.tokenizer import PaliGemmaTokenizer
    from paligemma_cli.training.tokenizer_training import train_tokenizer

    ckpt = work / config_name
    if (ckpt / "config.json").exists():  # `save_model` writes the folder whole or not at all
        return ckpt
    t0 = time.perf_counter()
    cfg = model_config(config_name)
    data = write_dataset(work / "data", n=16, seed=0, image_size=cfg.image_size)
    # A real vocabulary needs the real tokenizer; a small one with the same special layout is enough
    # here. The embedding keeps the published shape (257216 rows); only <image>'s id follows the
    # small tokenizer, as `train` checks that the two agree.
    texts = [json.loads(line)["suffix"] for line in data.read_text().splitlines()]
    tok_dir = work / "tok"
    tok_dir.mkdir(parents=True, exist_ok=True)
    train_tokenizer(texts, tok_dir / "tokenizer.model", vocab_size=320)
    image_token_id = PaliGemmaTokenizer.from_file(tok_dir / "tokenizer.model").image_token_id
    cfg = model_config(config_name)
    cfg.image_token_id = image_token_id
    with torch.device("meta"):
        model = PaliGemma(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    save_model(model, ckpt, tokenizer_dir=tok_dir, max_shard_bytes=2_000_000_000)
    del model
    print(f"wrote {ckpt} in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    return ckpt


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
    """ours: a `Pipeline` (with `fast`: `use_fast_cpu_layout` applied, as chat, caption of 4+ images and
    eval load); hf: `PaliGemmaForConditionalGeneration` in eval mode. `dtype` is "bf16" or "fp32"."""
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
        # `decoder`, as `Pipeline.stream` does: the model, or its `CompiledDecoder` after `Pipeline.compile()`.
        for token in generate_tokens(obj.decoder, batch, SamplingOptions(max_new_tokens=new_tokens), -1, pad_id):
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


def run_b1(pipe, prep: dict, new_tokens: int) -> dict:
    """Ours on `prepare`'s batch-1 inputs: `generate("ours", ...)` (exactly `new_tokens` greedy tokens)."""
    return generate("ours", pipe, prep["inputs"]["b1"], new_tokens, prep["inputs"]["pad_id"])


def chat_ttft(pipe, image) -> dict:
    """TTFT of a `ChatSession`'s first question about `image` and of a follow-up (the image cached)."""
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


def run_rss_child(script: Path, variant: dict, prep: dict, args) -> dict:
    """`child_rss` of `variant` in a fresh process: `script --child rss ...` (speed.py's hidden flags)."""
    cmd = [sys.executable, str(Path(script).resolve()), "--child", "rss", "--impl", variant["impl"],
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
    """Does `paligemma ask` take `--quantize`?"""
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


