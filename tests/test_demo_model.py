"""The shipped demo model still works: it loads by default and meets a floor on fresh shapes examples.

The floors sit well below what `paligemma eval` measured on 1000 held-out examples (docs/demo-model.md), so a
broken model, tokenizer, processor or decoding step fails here, while noise on 100 examples does not.
"""

from pathlib import Path

import pytest

from paligemma_cli.data.jsonl import read_jsonl
from paligemma_cli.data.shapes import write_dataset
from paligemma_cli.evaluation.evaluate import evaluate
from paligemma_cli.inference.generate import SamplingOptions
from paligemma_cli.inference.pipeline import Pipeline
from paligemma_cli.settings import resolve_model

DEMO = Path(__file__).resolve().parents[1] / "paligemma_cli" / "demo" / "model"
# Measured on this fixed set (bf16, 2026-11-29 model): color 100, count 100, caption 90.0, detect 100,
# spatial 83.3 (chance 50). Floors sit clearly above chance and a few examples below those figures.
FLOORS = {"color": ("exact_match", 85.0), "count": ("exact_match", 85.0), "caption": ("exact_match", 70.0),
          "detect": ("accuracy", 85.0), "spatial": ("exact_match", 65.0)}


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.load(resolve_model(None), "cpu", "auto")


@pytest.fixture(scope="module")
def report(pipe, tmp_path_factory):
    data = write_dataset(tmp_path_factory.mktemp("fresh"), n=150, seed=12345)  # a seed used nowhere else
    return evaluate(pipe, read_jsonl(data), SamplingOptions(max_new_tokens=32), batch_size=32)


def test_demo_model_is_the_default(monkeypatch, tmp_path):
    monkeypatch.delenv("PALIGEMMA_MODEL", raising=False)
    monkeypatch.delenv("PALIGEMMA_CONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_model(None).resolve() == DEMO.resolve()
    size = sum(f.stat().st_size for f in DEMO.iterdir())
    assert size < 16e6, f"the shipped demo model is {size / 1e6:.1f} MB"


@pytest.mark.parametrize("task", sorted(FLOORS))
def test_demo_model_meets_its_floor(report, task):
    metric, floor = FLOORS[task]
    result = report.tasks[task]
    assert result.n >= 10
    assert result.metrics[metric] >= floor, f"{task} {metric} = {result.metrics[metric]:.1f} < {floor}"


@pytest.mark.parametrize("prompt, answer", [
    ("answer en what color is the circle?", "orange"),
    ("caption en", "a green square, an orange circle and a red triangle"),
])
def test_demo_model_answers_the_readme_example(pipe, prompt, answer):
    """The README's first command, `paligemma ask examples/shapes.png "what color is the circle?"`."""
    image = Path(__file__).resolve().parents[1] / "examples" / "shapes.png"
    assert "".join(pipe.stream(image, prompt, SamplingOptions(max_new_tokens=32))) == answer
