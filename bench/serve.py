"""`paligemma serve` under load: agreement with `paligemma ask`, batching speed-up, and a soak of abuse.

A bounded load generator on 127.0.0.1 against the real server (a child process, `python -m paligemma_cli
serve`), in three parts, each optional (`--skip`), after `phases`: the engine's own costs in this process
(vision tower, prefill, decode step; batch 1 and 8), which say how much batching can give at most.

- agreement: 8 (image, prompt) pairs answered by `paligemma ask` (child processes, greedy) and by the
  server alone, streamed, and as 8 concurrent mixed requests; how many answers are identical.
- speed: the same 8 requests one after another, then all 8 at once (`--rounds` times each): aggregate
  completion tokens/s, time to first token p50/p99 and tokens/s per client (completion tokens over that
  client's whole request time). The server runs without its image-feature cache unless
  `--image-cache-mb` says otherwise: the second run of the same images would otherwise skip the tower.
- soak: `--soak` requests from `--soak-clients` threads, a mix of valid ones (streamed or not), invalid
  ones (bad JSON, a non-image data URL, a local path, a remote URL, too many images, too many tokens,
  an unknown model, a wrong key) and streams the client drops after their first token. It counts valid
  requests that failed, invalid ones that got the wrong status, whether the server is still alive, and
  its resident memory (VmRSS) after the first 100 requests and at the end.

Checkpoints: `demo` is the shipped demo model; `paligemma-3b-224` is a random bf16 checkpoint of that
shape with a tiny trained tokenizer (whose ids the random embedding rows are limited to, so answers are
printable and never end early), written once into `--cache` by this script with the package's own model
class.

    python bench/serve.py --model demo --json bench/results/serve-demo.json
    python bench/serve.py --model paligemma-3b-224 --skip agreement,soak --max-tokens 64 --rounds 1
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

KEY = "bench-key"
N_CLIENTS = 8


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- machine and checkpoint ----------------------------------------------------------------------------


def machine() -> dict:
    import torch

    info = {"cpu": platform.processor() or platform.machine(), "flags": [], "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "python": platform.python_version()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                info["flags"] = sorted(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in have)
                break
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def random_checkpoint(preset: str, cache: Path) -> Path:
    """A random bf16 checkpoint of `preset` (built once): weights N(0, 0.02), norms 0, and every embedding
    row outside the tiny tokenizer's text pieces zero, so that greedy answers are printable and long."""
    import torch

    from paligemma_cli.checkpoints.hf import save_model
    from paligemma_cli.model.config import PaliGemmaConfig
    from paligemma_cli.model.paligemma import PaliGemma
    from paligemma_cli.model.skeleton import empty_skeleton
    from paligemma_cli.processing.tokenizer import PaliGemmaTokenizer
    from tests.fixtures.tokenizer import make_tiny_tokenizer

    folder = cache / f"serve-{preset}-bf16"
    if (folder / "config.json").exists():
        return folder
    log(f"building a random {preset} checkpoint in {folder} (once)")
    tmp = cache / f"serve-{preset}.tokenizer"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok = PaliGemmaTokenizer.from_file(make_tiny_tokenizer(tmp))
    cfg = PaliGemmaConfig.from_name(preset, image_token_id=tok.image_token_id)
    with empty_skeleton():
        model = PaliGemma(cfg)
    model = model.to(torch.bfloat16).to_empty(device="cpu")  # bf16 from the start: no float32 copy
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # SigLIP LayerNorm scales 1; Gemma RMSNorm (1 + w) scales and every bias 0
                p.fill_(1.0 if "vision" in name and "norm" in name and name.endswith("weight") else 0.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
        emb = model.language_model.embed_tokens.weight
        emb[:4] = 0  # pad, eos, bos, unk never win the argmax ...
        emb[tok.image_token_id:] = 0  # ... nor ids the tiny tokenizer lacks
    save_model(model, folder, tokenizer_dir=tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    return folder


# --- requests -------------------------------------------------------------------------------------------


def scenes(n: int, size: int, seed: int = 0, min_shapes: int = 1) -> list:
    from paligemma_cli.data.shapes import make_scene, render

    return [render(make_scene(seed, i, 64, min_shapes)).resize((size, size)) for i in range(n)]


def data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def body(question: str, image_url: str, max_tokens: int, stream: bool = False, **kw) -> dict:
    content = [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": image_url}}]
    out = {"model": "bench", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
           "stream": stream, **kw}
    if stream:
        out["stream_options"] = {"include_usage": True}
    return out


def call(client: httpx.Client, url: str, payload: dict, key: str = KEY, drop_after_first: bool = False) -> dict:
    """One request; returns status, text, completion tokens, ttft (first content) and total seconds."""
    t0 = time.perf_counter()
    headers = {"Authorization": f"Bearer {key}"}
    if not payload.get("stream"):
        r = client.post(url + "/v1/chat/completions", json=payload, headers=headers)
        total = time.perf_counter() - t0
        if r.status_code != 200:
            return {"status": r.status_code, "error": r.text[:200], "total_s": total}
        j = r.json()
        return {"status": 200, "text": j["choices"][0]["message"]["content"], "total_s": total,
                "tokens": j["usage"]["completion_tokens"], "ttft_s": total, "finish": j["choices"][0]["finish_reason"]}
    parts, ttft, tokens, finish, done, error = [], None, 0, None, False, None
    with client.stream("POST", url + "/v1/chat/completions", json=payload, headers=headers) as r:
        if r.status_code != 200:
            r.read()
            return {"status": r.status_code, "error": r.text[:200], "total_s": time.perf_counter() - t0}
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            event = json.loads(line[6:])
            if "error" in event:
                error = event["error"]
                break
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for choice in event.get("choices", []):
                piece = choice["delta"].get("content")
                if piece:
                    ttft = ttft or time.perf_counter() - t0
                    parts.append(piece)
                    if drop_after_first:
                        return {"status": 200, "dropped": True, "total_s": time.perf_counter() - t0}
                finish = choice.get("finish_reason") or finish
    total = time.perf_counter() - t0
    if error or not done:
        return {"status": 200, "error": str(error or "stream ended without [DONE]"), "total_s": total}
    return {"status": 200, "text": "".join(parts), "tokens": tokens, "ttft_s": ttft or total, "total_s": total,
            "finish": finish}


# --- the server -----------------------------------------------------------------------------------------


class Server:
    def __init__(self, folder: Path, args, log_file: Path):
        cmd = [sys.executable, "-m", "paligemma_cli", "serve", "--model", str(folder), "--port", "0",
               "--api-key", KEY, "--model-name", "bench", "--max-batch", str(args.max_batch),
               "--max-queue", "64", "--max-tokens", str(args.max_tokens), "--dtype", args.dtype,
               "--request-timeout", "86400"]  # a slow machine's 3B round must not hit the 300 s default
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        cmd += ["--image-cache-mb", str(args.image_cache_mb)]
        self.log = open(log_file, "w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            self.log.write(line)
            if "serving " in line:
                self.url = line.split(" on ", 1)[1].split("/v1", 1)[0]
                break
            if not line and self.proc.poll() is not None:
                raise SystemExit(f"the server did not start; see {log_file}")
        threading.Thread(target=self._copy_log, daemon=True).start()
        while True:
            try:
                httpx.get(self.url + "/health", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.1)

    def _copy_log(self):
        for line in self.proc.stderr:
            self.log.write(line)
        self.log.flush()

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        self.proc.terminate()
        rc = self.proc.wait(120)
        self.log.close()
        return rc


# --- the three parts ------------------------------------------------------------------------------------


def agreement(server: Server, folder: Path, pairs: list, args, work: Path) -> dict:
    """`paligemma ask` against the server: alone, streamed, and 8 concurrent mixed."""
    expected = []
    for i, (image, question) in enumerate(pairs):
        path = work / f"agree{i}.png"
        image.save(path)
        raw = question.split(" ", 1)[0] in ("caption", "detect", "describe", "answer")
        cmd = [sys.executable, "-m", "paligemma_cli", "ask", str(path), *(["--prompt", question] if raw else [question]),
               "--model", str(folder), "--max-tokens", str(args.max_tokens), "--dtype", args.dtype]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=True)
        expected.append(out.stdout.removesuffix("\n"))
    urls = [data_url(image) for image, _ in pairs]
    with httpx.Client(timeout=600) as c:
        alone = [call(c, server.url, body(q, u, args.max_tokens))["text"] for (_, q), u in zip(pairs, urls)]
        streamed = [call(c, server.url, body(q, u, args.max_tokens, stream=True))["text"]
                    for (_, q), u in zip(pairs, urls)]
    with ThreadPoolExecutor(len(pairs)) as pool:
        def one(i):
            with httpx.Client(timeout=600) as c:
                return call(c, server.url, body(pairs[i][1], urls[i], args.max_tokens, stream=i % 2 == 1))["text"]
        together = list(pool.map(one, range(len(pairs))))
    same = lambda got: sum(a == b for a, b in zip(got, expected))
    return {"pairs": len(pairs), "same_alone": same(alone), "same_streamed": same(streamed),
            "same_batch_of_8_mixed": same(together),
            "examples": [{"question": q, "ask": e, "server_batch": t} for (_, q), e, t in zip(pairs, expected, together)]}


def percentile(xs: list, q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]


def speed(server: Server, requests: list, rounds: int) -> dict:
    """The same requests one after another, then all at once, alternating, `rounds` times each (streamed),
    so that a change in the shared machine's load hits both. Clients and their connections are made
    before the clock starts; a round's wall time runs from its first request's start to its last one's end."""
    clients = [httpx.Client(timeout=None) for _ in requests]
    call(clients[0], server.url, requests[0])  # warm-up: the first call's one-time costs are not batching's
    for c in clients:
        c.get(server.url + "/health")  # each client's connection is open before the clock starts
    results = {"sequential": [], "concurrent": []}
    walls = {"sequential": [], "concurrent": []}
    for r in range(rounds):
        for mode in ("sequential", "concurrent"):
            if mode == "sequential":
                got = [timed_call(clients[0], server.url, p) for p in requests]
            else:
                barrier = threading.Barrier(len(requests))

                def one(i):
                    barrier.wait()
                    return timed_call(clients[i], server.url, requests[i])
                with ThreadPoolExecutor(len(requests)) as pool:
                    got = list(pool.map(one, range(len(requests))))
            bad = [g for g in got if "text" not in g]
            if bad:
                raise SystemExit(f"{mode}: {len(bad)} requests failed: {bad[:2]}")
            wall = max(g["end"] for g in got) - min(g["start"] for g in got)
            walls[mode].append(wall)
            results[mode] += got
            tokens = sum(g["tokens"] for g in got)
            log(f"{mode} round {r + 1}: {tokens} tokens in {wall:.2f}s = {tokens / wall:.2f} tok/s")
    for c in clients:
        c.close()
    out = {}
    for mode in ("sequential", "concurrent"):
        per_round_tokens = sum(g["tokens"] for g in results[mode]) / rounds
        ttft = [g["ttft_s"] for g in results[mode]]
        per_client = [g["tokens"] / g["total_s"] for g in results[mode]]
        out[mode] = {"rounds": rounds, "tokens_per_round": per_round_tokens,
                     "wall_s": [round(w, 3) for w in walls[mode]],
                     "aggregate_tokens_per_s": round(statistics.median(per_round_tokens / w for w in walls[mode]), 3),
                     "ttft_p50_s": round(percentile(ttft, 50), 4), "ttft_p99_s": round(percentile(ttft, 99), 4),
                     "client_tokens_per_s_p50": round(percentile(per_client, 50), 3),
                     "client_tokens_per_s_min": round(min(per_client), 3)}
    ratios = [s / c for s, c in zip(walls["sequential"], walls["concurrent"])]  # same tokens: wall ratio
    out["speedup_aggregate"] = round(out["concurrent"]["aggregate_tokens_per_s"]
                                     / out["sequential"]["aggregate_tokens_per_s"], 3)
    out["speedup_per_round"] = {"median": round(statistics.median(ratios), 3), "min": round(min(ratios), 3),
                                "max": round(max(ratios), 3)}
    return out


def timed_call(client, url, payload) -> dict:
    start = time.perf_counter()
    got = call(client, url, payload)
    return {**got, "start": start, "end": time.perf_counter()}


INVALID = ["bad_json", "not_image", "local_path", "remote_url", "too_many_images", "too_many_tokens",
           "unknown_model", "wrong_key"]
EXPECTED_STATUS = {"bad_json": 400, "not_image": 400, "local_path": 400, "remote_url": 400,
                   "too_many_images": 400, "too_many_tokens": 400, "unknown_model": 404, "wrong_key": 401}


def soak(server: Server, images: list, n: int, clients: int, max_tokens: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    urls = [data_url(im) for im in images]
    questions = ["caption en", "detect circle", "what color is the square?", "how many shapes are there?",
                 "answer en is the circle left of the square?", "detect triangle ; square"]
    plan = []
    for i in range(n):
        roll = rng.random()
        kind = "valid" if roll < 0.7 else "invalid" if roll < 0.85 else "cancel"
        plan.append((kind, rng.choice(INVALID), rng.choice(questions), rng.choice(urls), rng.random() < 0.5,
                     rng.randint(1, max_tokens)))
    lock = threading.Lock()
    counts = {"valid_ok": 0, "valid_failed": 0, "invalid_right_status": 0, "invalid_wrong_status": 0,
              "cancelled": 0, "client_errors": 0}
    failures, statuses = [], {}
    done = [0]
    rss = {}
    todo = iter(enumerate(plan))

    def worker():
        with httpx.Client(timeout=600) as c:
            while True:
                with lock:
                    item = next(todo, None)
                if item is None:
                    return
                i, (kind, bad, question, url, stream, tokens) = item
                try:
                    if kind == "valid":
                        got = call(c, server.url, body(question, url, tokens, stream=stream))
                        ok = "text" in got
                        key = "valid_ok" if ok else "valid_failed"
                        if not ok:
                            failures.append(got)
                    elif kind == "cancel":
                        call(c, server.url, body(question, url, max_tokens, stream=True), drop_after_first=True)
                        key = "cancelled"
                    else:
                        status = invalid_request(c, server.url, bad, url)
                        statuses[bad] = statuses.get(bad, 0) + 1
                        key = "invalid_right_status" if status == EXPECTED_STATUS[bad] else "invalid_wrong_status"
                        if key == "invalid_wrong_status":
                            failures.append({"kind": bad, "status": status})
                except httpx.HTTPError as e:
                    key = "client_errors"
                    failures.append({"kind": kind, "error": repr(e)})
                with lock:
                    counts[key] += 1
                    done[0] += 1
                    if done[0] == 100:
                        rss["after_100_mb"] = server.rss_mb()
                    if done[0] % 100 == 0:
                        log(f"soak: {done[0]}/{n} {counts}")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    time.sleep(1.0)  # let the last dropped streams be noticed
    rss["end_mb"] = server.rss_mb()
    health = httpx.get(server.url + "/health", timeout=10).json() if server.alive() else None
    return {"requests": n, "clients": clients, "wall_s": round(wall, 1), **counts,
            "server_alive": server.alive(), "health": health,
            "rss_after_100_mb": round(rss.get("after_100_mb", float("nan")), 1), "rss_end_mb": round(rss["end_mb"], 1),
            "rss_growth": round(rss["end_mb"] / rss["after_100_mb"] - 1, 4) if rss.get("after_100_mb") else None,
            "invalid_kinds": statuses, "failures": failures[:10]}


def invalid_request(c: httpx.Client, url: str, bad: str, image_url: str) -> int:
    auth = {"Authorization": f"Bearer {KEY}"}
    target = url + "/v1/chat/completions"
    if bad == "bad_json":
        return c.post(target, content=b'{"model": "bench", "messages": [', headers=auth).status_code
    payload = body("caption en", image_url, 8)
    content = payload["messages"][0]["content"]
    if bad == "not_image":
        content[1]["image_url"]["url"] = "data:text/plain;base64,aGVsbG8="
    elif bad == "local_path":
        content[1]["image_url"]["url"] = "/etc/passwd"
    elif bad == "remote_url":
        content[1]["image_url"]["url"] = "http://169.254.169.254/latest/meta-data/"
    elif bad == "too_many_images":
        content += [content[1]] * 8
    elif bad == "too_many_tokens":
        payload["max_tokens"] = 10**6
    elif bad == "unknown_model":
        payload["model"] = "gpt-4o"
    elif bad == "wrong_key":
        return c.post(target, json=payload, headers={"Authorization": "Bearer nope"}).status_code
    return c.post(target, json=payload, headers=auth).status_code


def phases(folder: Path, args, images: list) -> dict:
    """Engine costs in this process, without HTTP: ms for the vision tower, a prompt's prefill and a decode
    step, alone and for 8 rows at once (medians of 5): what batching can and cannot speed up."""
    import torch

    from paligemma_cli.inference.pipeline import Pipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = Pipeline.load(folder, "cpu", args.dtype, fast_layout=True)
    model = pipe.model
    ids = torch.tensor([pipe.processor.prompt_ids("caption en")])
    out = {}

    def ms(fn, reps=5):
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
        return round(statistics.median(times), 2)

    with torch.inference_mode():
        for B in (1, N_CLIENTS):
            px = pipe.processor.pixel_values(images[:B])
            feats = model.image_features(px)
            batch = ids.expand(B, -1)
            out[f"vision_b{B}_ms"] = ms(lambda: model.image_features(px))

            def prefill():
                cache = model.new_cache(B, batch.shape[1] + 2)
                model.extend(cache, batch, token_type_ids=torch.zeros_like(batch), image_features=feats)
                return cache
            out[f"prefill_b{B}_ms"] = ms(prefill)
            cache, token = prefill(), torch.full((B, 1), 5)

            def step():
                snap = cache.snapshot()
                model.extend(cache, token)
                cache.restore(snap)
            out[f"decode_step_b{B}_ms"] = ms(step, 20)
    return out


# --- main -----------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="demo", help="demo, or a preset for a random checkpoint (paligemma-3b-224)")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--max-tokens", type=int, default=64, help="max_tokens of the speed requests and the cap")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--threads", type=int, help="the server's --threads (default: torch's, one per core)")
    ap.add_argument("--image-cache-mb", type=float, default=0.0,
                    help="the server's --image-cache-mb; 0 (the default here) so that the sequential and the "
                         "concurrent runs of the same images both pay for the vision tower")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--soak", type=int, default=1000)
    ap.add_argument("--soak-clients", type=int, default=16)
    ap.add_argument("--skip", default="", help="comma-separated: phases, agreement, speed, soak")
    ap.add_argument("--cache", type=Path, default=Path("~/.cache/paligemma-bench").expanduser())
    ap.add_argument("--json", type=Path, help="write the report here")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))

    from paligemma_cli.model.config import PaliGemmaConfig
    from paligemma_cli.settings import DEMO_MODEL

    report = {"command": "python bench/serve.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine()}
    folder = DEMO_MODEL if args.model == "demo" else random_checkpoint(args.model, args.cache)
    size = PaliGemmaConfig.from_json(folder / "config.json").image_size
    report["model"] = {"name": args.model, "folder": str(folder), "dtype": args.dtype, "image_size": size}
    images = scenes(20, size)
    if "phases" not in skip:
        log("phases: vision, prefill and a decode step at batch 1 and 8, in this process")
        report["phases"] = phases(folder, args, images)
        log(f"phases: {report['phases']}")
    work = args.cache / "serve-work"
    work.mkdir(parents=True, exist_ok=True)
    log_file = work / f"server-{args.model}.log"
    log(f"starting the server on {folder} ({args.dtype}); its log: {log_file}")
    t0 = time.perf_counter()
    server = Server(folder, args, log_file)
    report["server_start_s"] = round(time.perf_counter() - t0, 2)
    report["rss_after_start_mb"] = round(server.rss_mb(), 1)
    questions = ["caption en", "what color is the circle?", "detect circle", "how many shapes are there?",
                 "caption en", "detect square ; triangle", "answer en is the circle left of the square?", "caption en"]
    try:
        if "agreement" not in skip:
            log("agreement with paligemma ask")
            report["agreement"] = agreement(server, folder, list(zip(images[:8], questions)), args, work)
            log(f"agreement: {report['agreement']['same_alone']}, {report['agreement']['same_streamed']}, "
                f"{report['agreement']['same_batch_of_8_mixed']} of 8 (alone, streamed, batch of 8)")
        if "speed" not in skip:
            log(f"speed: {N_CLIENTS} caption requests, sequential vs concurrent, {args.rounds} rounds")
            # Three shapes a scene: the longest captions the demo model gives (about a dozen tokens).
            busy = scenes(N_CLIENTS, size, seed=1, min_shapes=3)
            requests = [body("caption en", data_url(im), args.max_tokens, stream=True) for im in busy]
            report["speed"] = speed(server, requests, args.rounds)
            report["speed"]["engine_after"] = httpx.get(server.url + "/health", timeout=10).json().get("engine")
            log(f"speed-up {report['speed']['speedup_aggregate']}x")
        if "soak" not in skip:
            log(f"soak: {args.soak} requests, {args.soak_clients} clients")
            report["soak"] = soak(server, images, args.soak, args.soak_clients, min(args.max_tokens, 32))
    finally:
        report["server_exit_code_after_sigterm"] = server.stop()
        report["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
