"""Time to first token of `paligemma chat`: first question (vision + full prefill) vs later ones.

Also measures how often the reused-cache answers equal the exact (`paligemma ask`) answers, since
cached image tokens never see the question (see `core/chat_session.py`).

    .venv/bin/python bench/chat_ttft.py                        # runs/demo if it exists
    .venv/bin/python bench/chat_ttft.py --model none           # a random demo-64 model
    .venv/bin/python bench/chat_ttft.py --model none --image-size 224 --agreement 0   # 784 image tokens
    .venv/bin/python bench/chat_ttft.py --runs 15 --agreement 100

Prints numbers only; not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from paligemma_cli.core.chat_session import ChatSession  # noqa: E402
from paligemma_cli.core.generate import SamplingOptions  # noqa: E402
from paligemma_cli.core.pipeline import Pipeline  # noqa: E402


def random_demo_pipeline(device: str, image_size: int | None = None) -> Pipeline:
    """A random model of the `demo-64` shape with the tiny test tokenizer (no trained model needed)."""
    import torch

    from paligemma_cli.core.config import PaliGemmaConfig
    from paligemma_cli.core.paligemma import PaliGemma
    from paligemma_cli.core.processor import PaliGemmaProcessor
    from paligemma_cli.core.tokenizer import PaliGemmaTokenizer
    from tests.tokenizer_fixture import make_tiny_tokenizer

    folder = Path(tempfile.mkdtemp())
    tok = PaliGemmaTokenizer.from_file(make_tiny_tokenizer(folder))
    cfg = PaliGemmaConfig.from_name("demo-64", image_token_id=tok.image_token_id)
    if image_size:
        cfg.vision.image_size = image_size
    torch.manual_seed(0)
    model = PaliGemma(cfg).to(device).eval()
    return Pipeline(model, tok, PaliGemmaProcessor(tok, cfg.image_size, cfg.num_image_tokens), folder)


def load(model: str, device: str, dtype: str, image_size: int | None) -> tuple[Pipeline, str]:
    if model != "none" and Path(model).is_dir():
        return Pipeline.load(model, device, dtype), model
    return random_demo_pipeline(device, image_size), "random demo-64"


def ttft(pipe: Pipeline, image: Path, runs: int, max_tokens: int) -> None:
    questions = ["answer en what color is the square?", "answer en how many shapes are there?",
                 "answer en is the triangle left of the square?"]
    opts = SamplingOptions(max_new_tokens=max_tokens)
    first, later, exact = [], [], []
    for run in range(runs + 1):  # run 0 warms up allocators and kernels and is not counted
        session = ChatSession(pipe, opts)
        session.set_image(image)
        times = []
        for q in questions:
            "".join(session.ask(q))
            times.append(session.last.ttft_s)
        reference = ChatSession(pipe, opts, exact=True)
        reference.set_image(image)
        "".join(reference.ask(questions[1]))
        if run:
            first.append(times[0])
            later.extend(times[1:])
            exact.append(reference.last.ttft_s)
    f, s, e = statistics.median(first), statistics.median(later), statistics.median(exact)
    print(f"ttft first question  (vision + image prefill + question): {f * 1000:8.2f} ms  median of {runs}")
    print(f"ttft later questions (question only, cached image):      {s * 1000:8.2f} ms  median of {len(later)}")
    print(f"ttft exact mode / `ask` (everything every time):         {e * 1000:8.2f} ms  median of {runs}")
    print(f"ratio later / first: {s / f:.3f}   (target <= 0.2)")


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
    ap.add_argument("--model", default=str(ROOT / "runs" / "demo"), help="checkpoint folder, or none for random")
    ap.add_argument("--image", default=str(ROOT / "data" / "shapes-val" / "images" / "000002.png"))
    ap.add_argument("--data", default=str(ROOT / "data" / "shapes-val" / "data.jsonl"))
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--agreement", type=int, default=50, help="questions to compare (0 to skip)")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads; 1 keeps timings steady on a machine that is busy with other work")
    ap.add_argument("--image-size", type=int, default=None,
                    help="random model only: image side in pixels (64 -> 64 image tokens, 224 -> 784)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)

    pipe, name = load(args.model, args.device, args.dtype, args.image_size)
    print(f"model: {name} on {pipe.model.device}, {pipe.model.config.num_image_tokens} image tokens")
    ttft(pipe, Path(args.image), args.runs, args.max_tokens)
    if args.agreement and Path(args.data).is_file():
        agreement(pipe, Path(args.data), args.agreement, args.max_tokens)


if __name__ == "__main__":
    main()
