"""Peak memory of LoRA fine-tuning a full-size PaliGemma with `paligemma train`'s defaults.

Writes a random checkpoint of a published config (bf16 on disk, as the hub's v2 files) and a tiny
dataset at the model's resolution (`common.write_lora_checkpoint`, once), then runs the real command in a
child process and reads its peak RSS. Not a test: it needs ~14 GB of RAM and minutes of CPU.

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

from common import machine_info, machine_line, write_lora_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="paligemma2-3b-224")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--work", default="/tmp/lora-bench")
    args = ap.parse_args()

    machine = machine_info()
    print(machine_line(machine), file=sys.stderr)  # stdout is the JSON line alone
    work = Path(args.work)
    ckpt = write_lora_checkpoint(args.config, work)
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
                      "summary": proc.stdout.strip()[-500:], "stderr_tail": proc.stderr.strip()[-500:],
                      "machine": machine}))


if __name__ == "__main__":
    main()
