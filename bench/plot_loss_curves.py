"""Draw the training and validation loss of several `paligemma train` runs on one chart (a PNG).

Reads each run folder's `metrics.jsonl`: the training loss (smoothed over `--smooth` logged points) as a
thin line, the validation loss as a thick one with dots. Drawn with Pillow, so no plotting library is
needed. Also prints, per run, the first step at which the validation loss falls to each `--target`.

    .venv/bin/python bench/plot_loss_curves.py runs/demo-random runs/demo-init-vision \\
        --label "random vision tower" --label "vision tower from SigLIP" --out docs/init-vision-loss.png

Prints numbers only; not a test.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]
W, H, LEFT, RIGHT, TOP, BOTTOM = 900, 520, 70, 20, 40, 60


def read_metrics(run: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    train, val = [], []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        train.append((m["step"], m["loss"]))
        if "val_loss" in m:
            val.append((m["step"], m["val_loss"]))
    return train, val


def smooth(points: list[tuple[int, float]], k: int) -> list[tuple[int, float]]:
    out = []
    for i in range(len(points)):
        window = points[max(0, i - k + 1): i + 1]
        out.append((points[i][0], sum(v for _, v in window) / len(window)))
    return out


def first_step_at_or_below(val: list[tuple[int, float]], target: float) -> int | None:
    return next((s for s, v in val if v <= target), None)


def draw(curves: list[tuple[str, list, list]], out: Path, title: str, y_max: float | None) -> None:
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    steps = max(s for _, train, _ in curves for s, _ in train)
    values = [v for _, train, val in curves for _, v in train + val]
    lo, hi = 0.0, y_max or max(values)

    def xy(step: float, value: float) -> tuple[float, float]:
        x = LEFT + (W - LEFT - RIGHT) * step / steps
        y = TOP + (H - TOP - BOTTOM) * (1 - (min(value, hi) - lo) / (hi - lo))
        return x, y

    d.rectangle((LEFT, TOP, W - RIGHT, H - BOTTOM), outline="black")
    for i in range(6):  # gridlines and tick labels
        v = lo + (hi - lo) * i / 5
        _, y = xy(0, v)
        d.line((LEFT, y, W - RIGHT, y), fill=(225, 225, 225))
        d.text((8, y - 6), f"{v:.2f}", fill="black")
        s = steps * i / 5
        x, _ = xy(s, lo)
        d.text((x - 12, H - BOTTOM + 6), f"{s:.0f}", fill="black")
    d.text((W // 2 - 20, H - 25), "step", fill="black")
    d.text((LEFT, 12), title, fill="black")
    for n, (label, train, val) in enumerate(curves):
        colour = COLOURS[n % len(COLOURS)]
        faint = tuple(c + (255 - c) * 2 // 3 for c in colour)
        d.line([xy(s, v) for s, v in train], fill=faint, width=1)
        d.line([xy(s, v) for s, v in val], fill=colour, width=3)
        for s, v in val:
            x, y = xy(s, v)
            d.ellipse((x - 4, y - 4, x + 4, y + 4), fill=colour)
        ly = TOP + 12 + 18 * n
        d.line((W - 330, ly + 6, W - 300, ly + 6), fill=colour, width=3)
        d.text((W - 292, ly), f"{label} (validation; faint: training)", fill="black")
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--label", action="append", default=[], help="one per run, in order (default: the folder)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--title", default="paligemma train: loss on suffix tokens")
    ap.add_argument("--smooth", type=int, default=10, help="training-loss points averaged")
    ap.add_argument("--y-max", type=float, default=None)
    ap.add_argument("--target", type=float, action="append", default=[], help="validation loss to reach")
    args = ap.parse_args()
    labels = args.label + [str(r) for r in args.runs[len(args.label):]]
    curves = []
    for run, label in zip(args.runs, labels):
        train, val = read_metrics(run)
        curves.append((label, smooth(train, args.smooth), val))
        report = {"run": str(run), "label": label, "val_loss": {s: round(v, 4) for s, v in val}}
        report["first_step_at_or_below"] = {t: first_step_at_or_below(val, t) for t in args.target}
        print(json.dumps(report))
    draw(curves, args.out, args.title, args.y_max)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
