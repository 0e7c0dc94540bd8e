"""Peak memory of LoRA fine-tuning a full-size PaliGemma with `paligemma train`'s defaults.

Writes a random checkpoint of a published config (bf16 on disk, as the hub's v2 files), a tiny
dataset at the model's resolution, then runs the real command in a child process and reads its peak
RSS. Not a test: it needs ~14 GB of RAM and minutes of CPU.

    python bench/lora_memory.py --config paligemma2-3b-224 --steps 1 --work /tmp/lora-bench
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="paligemma2-3b-224")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--work", default="/tmp/lora-bench")
    args = ap.parse_args()

    import torch

    from paligemma_cli.data.shapes import write_dataset
    from paligemma_cli.model.config import PaliGemmaConfig
    from paligemma_cli.model.paligemma import PaliGemma
    from paligemma_cli.processing.tokenizer import PaliGemmaTokenizer
    from paligemma_cli.training.tokenizer_training import train_tokenizer

    work = Path(args.work)
    ckpt = work / args.config
    cfg = PaliGemmaConfig.from_name(args.config)
    if not (ckpt / "model.safetensors.index.json").exists():
        t0 = time.perf_counter()
        data = write_dataset(work / "data", n=16, seed=0, image_size=cfg.image_size)
        # A real vocabulary needs the real tokenizer; a small one with the same special layout is enough
        # here. The embedding keeps the published shape (257216 rows); only <image>'s id follows the
        # small tokenizer, as `train` checks that the two agree.
        texts = [json.loads(l)["suffix"] for l in data.read_text().splitlines()]
        tok_dir = work / "tok"
        tok_dir.mkdir(parents=True, exist_ok=True)
        train_tokenizer(texts, tok_dir / "tokenizer.model", vocab_size=320)
        image_token_id = PaliGemmaTokenizer.from_file(tok_dir / "tokenizer.model").image_token_id
        cfg = PaliGemmaConfig.from_name(args.config, image_token_id=image_token_id)
        with torch.device("meta"):
            model = PaliGemma(cfg)
        model = model.to_empty(device="cpu").to(torch.bfloat16)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
        model.save_pretrained(ckpt, tokenizer_dir=tok_dir, max_shard_bytes=2_000_000_000)
        del model
        print(f"wrote {ckpt} in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    out = work / "run"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "paligemma_cli", "train", str(work / "data" / "data.jsonl"), "--model", str(ckpt),
           "--out", str(out), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--lora-save", "adapter", "--json"]
    if args.gradient_checkpointing:
        cmd.append("--gradient-checkpointing")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9  # ru_maxrss is KiB on Linux
    print(json.dumps({"config": args.config, "steps": args.steps, "batch_size": args.batch_size,
                      "gradient_checkpointing": args.gradient_checkpointing, "returncode": proc.returncode,
                      "peak_rss_gb": round(peak_gb, 2), "wall_s": round(wall, 1),
                      "summary": proc.stdout.strip()[-500:], "stderr_tail": proc.stderr.strip()[-500:]}))


if __name__ == "__main__":
    main()
