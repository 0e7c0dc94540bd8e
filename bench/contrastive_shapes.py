"""Contrastive training on shapes-world captions: train a dual encoder, report retrieval recall on held-out scenes.

Writes caption-only shapes datasets (training seed 0, held-out seed 1), trains `siglip-demo-64` (or
another preset) from scratch with `run_contrastive_training`, then scores image->text and text->image
recall@1/5 on the held-out captions with `evaluate_retrieval`. A caption counts as right when it is the
image's own or the same text (single-shape captions repeat), as `paligemma eval --task retrieval` does.
Chance level is printed next to the result.

    .venv/bin/python bench/contrastive_shapes.py                              # siglip, 300 steps
    .venv/bin/python bench/contrastive_shapes.py --objective clip --steps 600 --device cuda
    .venv/bin/python bench/contrastive_shapes.py --max-length 16 --threads 1  # quicker on a busy CPU

Prints numbers only; not a test.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import machine_info, machine_line

from paligemma_cli.checkpoints.hf import load_dual_encoder
from paligemma_cli.data.jsonl import read_jsonl
from paligemma_cli.data.shapes import write_dataset
from paligemma_cli.evaluation.retrieval import evaluate_retrieval, match_matrix
from paligemma_cli.processing.siglip_tokenizer import SiglipTokenizer
from paligemma_cli.training.contrastive import run_contrastive_training


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objective", default="siglip", choices=["siglip", "clip"])
    ap.add_argument("--model-config", default="siglip-demo-64")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=None, help="text positions (default: the preset's, 64)")
    ap.add_argument("--hard-negatives", type=int, default=0, help="reordered captions per image and step")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", type=Path, default=None, help="run folder (default: a temporary one)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = machine_info()
    print(machine_line(machine), file=sys.stderr)  # stdout is the JSON line alone

    work = Path(tempfile.mkdtemp(prefix="contrastive-shapes-"))
    # Caption lines only (in the full task mix only 20 % are captions); the same files as
    # `paligemma demo-data DIR --n N --seed S --task caption`.
    train = write_dataset(work / "train", args.n_train, seed=0, image_size=args.image_size, tasks=["caption"])
    test = write_dataset(work / "test", args.n_test, seed=1, image_size=args.image_size, tasks=["caption"])
    out = args.out or work / "run"

    t0 = time.perf_counter()
    summary = run_contrastive_training(
        dict(data=str(train), out=str(out), objective=args.objective, model_config=args.model_config,
             steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=min(50, args.steps // 10),
             max_length=args.max_length, hard_negatives=args.hard_negatives, save_every=10**9, log_every=max(1, args.steps // 10)),
        device=args.device,
        on_log=lambda m: print(f"step {m['step']}/{args.steps}  loss {m['loss']:.4f}  t {m['temperature']:.2f}  "
                               f"b {m['bias']:.2f}", file=sys.stderr) if m["step"] % max(1, args.steps // 10) == 0 else None,
    )
    train_s = time.perf_counter() - t0

    model = load_dual_encoder(out, dtype=torch.float32, device=args.device)
    tokenizer = SiglipTokenizer.from_folder(out, model.config.text)
    examples = read_jsonl(test)
    report = evaluate_retrieval(model, tokenizer, examples, batch_size=128)
    right = match_matrix(examples).float()
    chance_r1 = 100 * (right.sum(1) / right.shape[1]).mean().item()  # a random ranking's recall@1
    print(json.dumps({
        "objective": args.objective, "model_config": args.model_config, "steps": args.steps,
        "hard_negatives": args.hard_negatives,
        "batch_size": args.batch_size, "train_pairs": args.n_train, "test_pairs": report.n, "device": args.device,
        "train_seconds": round(train_s, 1), "final_loss": round(summary["loss"], 4),
        **{k: v for k, v in report.as_dict().items() if k.endswith("image") or k.endswith("text")},
        "chance_r1": round(chance_r1, 2), "machine": machine,
    }))


if __name__ == "__main__":
    main()
