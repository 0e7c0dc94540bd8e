"""Time to first token of `paligemma chat`: first question (vision + full prefill) vs later ones.

TTFT runs from the question reaching `ChatSession.ask` to the first token being sampled, as
`GenerationStats.ttft_s` reports it. The first question of an image pays for the vision tower, the
`<image> x n + <bos>` prefill and the question; a later one only for its own tokens (the image block is
cached). The image is read and resized by `set_image`, before any question; that time is printed apart.
Each figure is timed twice: by the wall clock (what a user sees) and by the thread's CPU time
(`time.thread_time`), which leaves out the time the process waited for a core on a busy machine.

Also measures how often the reused-cache answers equal the exact (`paligemma ask`) answers, since
cached image tokens never see the question (see `paligemma_cli/inference/chat_session.py`).

    .venv/bin/python bench/chat_ttft.py                        # the built-in demo model (as `paligemma chat`)
    .venv/bin/python bench/chat_ttft.py --model runs/demo      # a checkpoint folder
    .venv/bin/python bench/chat_ttft.py --model none           # a random demo-64 model, tiny test tokenizer
    .venv/bin/python bench/chat_ttft.py --model none --image-size 224 --agreement 0   # 784 image tokens
    .venv/bin/python bench/chat_ttft.py --runs 15 --agreement 100
    .venv/bin/python bench/chat_ttft.py --compile --agreement 0   # as `paligemma chat --compile`

Prints numbers only; not a test.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
import types
from contextlib import contextmanager
from pathlib import Path

from common import ROOT, load_pipeline, machine_info, machine_line

import paligemma_cli.inference.chat_session as chat_session_module
import paligemma_cli.inference.pipeline as pipeline_module
from paligemma_cli.inference.chat_session import ChatSession
from paligemma_cli.inference.generate import SamplingOptions
from paligemma_cli.inference.pipeline import Pipeline

CPU_CLOCK = types.SimpleNamespace(perf_counter=time.thread_time)


@contextmanager
def clock(kind: str):
    """Time `ChatSession.ask` and `Pipeline.stream_batch` (which set `ttft_s`) with the wall or CPU clock."""
    saved = chat_session_module.time, pipeline_module.time
    if kind == "cpu":
        chat_session_module.time = pipeline_module.time = CPU_CLOCK
    try:
        yield
    finally:
        chat_session_module.time, pipeline_module.time = saved


def ttft(pipe: Pipeline, image: Path, runs: int, max_tokens: int) -> None:
    questions = ["answer en what color is the square?", "answer en how many shapes are there?",
                 "answer en is the triangle left of the square?"]
    opts = SamplingOptions(max_new_tokens=max_tokens)
    kinds = ("wall", "cpu")
    first, later, exact = ({k: [] for k in kinds} for _ in range(3))
    prep = []
    for run in range(runs + 1):  # run 0 warms up allocators and kernels and is not counted
        for kind in kinds:
            session = ChatSession(pipe, opts)
            t = time.perf_counter()
            session.set_image(image)  # read + resize + normalize; no model work
            prep_s = time.perf_counter() - t
            times = []
            with clock(kind):
                for q in questions:
                    "".join(session.ask(q))
                    times.append(session.last.ttft_s)
                reference = ChatSession(pipe, opts, exact=True)
                reference.set_image(image)
                "".join(reference.ask(questions[1]))
            if run:
                first[kind].append(times[0])
                later[kind].extend(times[1:])
                exact[kind].append(reference.last.ttft_s)
                if kind == "wall":
                    prep.append(prep_s)
    n_q = [len(pipe.tokenizer.encode(q + "\n")) for q in questions]
    print(f"questions: {len(questions)} per session, {n_q} tokens; {runs} sessions; max {max_tokens} new tokens")
    print(f"image preprocessing in set_image (before the first question): "
          f"{statistics.median(prep) * 1000:.2f} ms median")
    med = {k: [statistics.median(xs[k]) for xs in (first, later, exact)] for k in kinds}
    rows = [("first question  (vision + image prefill + question):", 0, runs),
            ("later questions (question only, cached image):", 1, len(later["wall"])),
            ("exact mode / `ask` (everything every time):", 2, runs)]
    print(f"{'median ttft, ms':52s} {'wall clock':>10s} {'cpu time':>10s}")
    for label, i, n in rows:
        print(f"{label:52s} {med['wall'][i] * 1000:10.2f} {med['cpu'][i] * 1000:10.2f}   (n={n})")
    ratios = [med[k][1] / med[k][0] for k in kinds]
    print(f"{'ratio later / first (target <= 0.2):':52s} {ratios[0]:10.3f} {ratios[1]:10.3f}")


def agreement(pipe: Pipeline, data: Path, n: int, max_tokens: int) -> None:
    records = [json.loads(l) for l in data.read_text().splitlines()]
    records = [r for r in records if r["prefix"].startswith("answer ")][:n]
    opts = SamplingOptions(max_new_tokens=max_tokens)
    same = reuse_right = exact_right = 0
    for r in records:
        image = data.parent / r["image"]
        answers = []
        for exact in (False, True):
            session = ChatSession(pipe, opts, exact=exact)
            session.set_image(image)
            answers.append("".join(session.ask(r["prefix"])).strip())
        same += answers[0] == answers[1]
        reuse_right += answers[0] == r["suffix"]
        exact_right += answers[1] == r["suffix"]
    k = len(records)
    print(f"reuse == exact on {same}/{k} questions ({same / k:.0%}); "
          f"correct: reuse {reuse_right}/{k}, exact {exact_right}/{k}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo",
                    help="demo (the built-in demo model, default), a checkpoint folder, or none for a random model")
    ap.add_argument("--image", default=str(ROOT / "data" / "shapes-val" / "images" / "000002.png"))
    ap.add_argument("--data", default=str(ROOT / "data" / "shapes-val" / "data.jsonl"))
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--agreement", type=int, default=50, help="questions to compare (0 to skip)")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads; 1 keeps timings steady on a machine that is busy with other work")
    ap.add_argument("--compile", action="store_true",
                    help="compile the text-only steps (`paligemma chat --compile`); session 0 (not counted) compiles")
    ap.add_argument("--image-size", type=int, default=None,
                    help="random model only: image side in pixels (64 -> 64 image tokens, 224 -> 784)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)

    print("command:", shlex.join([Path(sys.executable).name, *sys.argv]))
    print(machine_line(machine_info()))
    pipe, name = load_pipeline(args.model, args.device, args.dtype, args.image_size)
    if args.compile:
        pipe.compile()
        name += ", --compile"
    print(f"model: {name} on {pipe.model.device}, {pipe.model.dtype}, {torch.get_num_threads()} thread(s), "
          f"{pipe.model.config.num_image_tokens} image tokens")
    ttft(pipe, Path(args.image), args.runs, args.max_tokens)
    if args.agreement and Path(args.data).is_file():
        agreement(pipe, Path(args.data), args.agreement, args.max_tokens)


if __name__ == "__main__":
    main()
