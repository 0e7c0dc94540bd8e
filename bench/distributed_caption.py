"""Captioning throughput of `paligemma caption` in 1 process against N processes under torchrun (gloo).

Every process runs with one thread (OMP_NUM_THREADS=1), so the comparison is one core against N cores'
worth of processes: the ideal ratio is N, and on a machine with N cores shared with other work, less.
Writes a folder of shapes-world scenes once, then alternates the two launches `--reps` times (so a
machine that gets busier part-way penalises both), each a fresh command line:

    python -m paligemma_cli caption IMAGES --out one.jsonl -b B             (1 process)
    torchrun --nproc-per-node N -m paligemma_cli caption IMAGES --out n.jsonl -b B

and reports, per launch, the command's own images/s (its `captioned … img/s` line: model loaded, until the
last record is merged) and the wall clock of the whole command (process start, imports, model loading
included), with the medians and the ratio N-process / 1-process of each. The two output files must be
identical; the script says so.

    python bench/distributed_caption.py --images 96 --reps 3
    python bench/distributed_caption.py --nproc 2 --batch-size 8 --model demo --json out.json

Prints numbers only; not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import machine_info, machine_line

RATE = re.compile(r"captioned (\d+) image\(s\) in ([\d.]+)s \(([\d.]+) img/s\)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv: list[str], out: Path) -> dict:
    out.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    found = RATE.search(proc.stderr)
    if proc.returncode != 0 or not found:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(argv)}\n{proc.stderr[-2000:]}")
    return {"images": int(found[1]), "seconds": float(found[2]), "images_per_s": float(found[3]),
            "wall_s": round(wall, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=96, help="scenes to caption")
    ap.add_argument("--nproc", type=int, default=2, help="processes of the torchrun launch")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--model", default="demo", help="demo (the built-in model) or a checkpoint folder")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--work", default="/tmp/distributed-caption-bench")
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args()

    machine = machine_info()
    print(machine_line(machine), flush=True)
    from paligemma_cli.data.shapes import write_dataset

    work = Path(args.work)
    images = work / f"scenes-{args.images}" / "images"
    if not images.is_dir():
        write_dataset(images.parent, args.images, seed=0)
    model = [] if args.model == "demo" else ["--model", args.model]
    common = ["caption", str(images), "-b", str(args.batch_size), *model]
    one_out, n_out = work / "one.jsonl", work / f"n{args.nproc}.jsonl"
    runs = {"1": [], str(args.nproc): []}
    for rep in range(args.reps):
        runs["1"].append(launch([sys.executable, "-m", "paligemma_cli", *common, "--out", str(one_out)], one_out))
        runs[str(args.nproc)].append(launch(
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc), "--master-addr",
             "127.0.0.1", "--master-port", str(free_port()), "-m", "paligemma_cli", *common, "--out", str(n_out)],
            n_out))
        print(f"rep {rep + 1}: 1 process {runs['1'][-1]}; {args.nproc} processes {runs[str(args.nproc)][-1]}",
              flush=True)
    same = one_out.read_bytes() == n_out.read_bytes()
    medians = {k: {"images_per_s": statistics.median(r["images_per_s"] for r in v),
                   "wall_s": statistics.median(r["wall_s"] for r in v)} for k, v in runs.items()}
    one, many = medians["1"], medians[str(args.nproc)]
    result = {"model": args.model, "images": args.images, "batch_size": args.batch_size, "nproc": args.nproc,
              "threads_per_process": 1, "runs": runs, "medians": medians,
              "ratio_images_per_s": round(many["images_per_s"] / one["images_per_s"], 2),
              "ratio_wall": round(one["wall_s"] / many["wall_s"], 2), "identical_outputs": same,
              "load_average_1_5_15": os.getloadavg(), "machine": machine}
    print(f"captioning: 1 process {one['images_per_s']:.2f} img/s, {args.nproc} processes "
          f"{many['images_per_s']:.2f} img/s: x{result['ratio_images_per_s']} "
          f"(whole command, start to end: x{result['ratio_wall']}); outputs identical: {same}")
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
