"""`paligemma eval` and core.evaluation: scores worked out by hand, then the command end to end."""

import json
from pathlib import Path

import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from paligemma_cli.data.jsonl import Example
from paligemma_cli.errors import PaliGemmaError
from paligemma_cli.evaluation.captions import cider_d, corpus_bleu
from paligemma_cli.evaluation.evaluate import score, score_example, select_examples, task_kind, task_name
from paligemma_cli.inference.pipeline import Pipeline
from tests.fixtures.checkpoints import make_tiny_checkpoint
from tests.fixtures.cli import one_line_error

runner = CliRunner()
IMG = Path("unused.png")  # score() reads no image when sizes are given
SIZE = (100, 100)


def ex(prefix, suffix, task=None, image=IMG):
    return Example(image, prefix, suffix, task)


def box(y0, x0, y1, x1, label):
    return f"<loc{y0:04d}><loc{x0:04d}><loc{y1:04d}><loc{x1:04d}> {label}"


# --- task inference ---------------------------------------------------------------------------


@pytest.mark.parametrize("prefix, kind", [
    ("answer en what color is the circle?", "vqa"),
    ("  Answer de welche Farbe?", "vqa"),
    ("caption en", "caption"),
    ("describe en", "caption"),
    ("detect cat ; dog", "detect"),
    ("ocr", "exact"),
    ("", "exact"),
])
def test_task_kind_from_prefix(prefix, kind):
    assert task_kind(prefix) == kind


def test_task_name_prefers_the_task_field():
    assert task_name(ex("answer en what color?", "red", task="color")) == "color"
    assert task_name(ex("answer en what color?", "red")) == "vqa"
    assert task_name(ex("ocr", "STOP")) == "other"


def test_examples_without_task_are_grouped_by_prefix():
    examples = [ex("answer en q?", "yes"), ex("caption en", "a cat"), ex("ocr", "STOP"), ex("answer en r?", "no")]
    result = score(["yes", "a cat", "stop", "yes"], examples, [SIZE] * 4)
    assert list(result) == ["vqa", "caption", "other"]
    assert result["vqa"].n == 2 and result["vqa"].metrics["exact_match"] == pytest.approx(50.0)
    assert result["other"].metrics == {"exact_match": 0.0}  # OCR-like tasks keep case


def test_a_task_that_mixes_prompt_kinds_is_split():
    examples = [ex("answer en q?", "yes", task="misc"), ex("caption en", "a cat", task="misc")]
    assert set(score(["yes", "a cat"], examples, [SIZE] * 2)) == {"misc/vqa", "misc/caption"}


# --- answers ----------------------------------------------------------------------------------


def test_three_color_answers_two_right():
    examples = [ex(f"answer en what color is the {s}?", c, task="color")
                for s, c in [("circle", "red"), ("square", "blue"), ("triangle", "green")]]
    result = score(["red", "Blue.", "purple"], examples)  # "Blue." normalises to "blue"
    color = result["color"]
    assert color.n == 3 and color.kind == "vqa"
    assert color.metrics["exact_match"] == pytest.approx(66.67, abs=0.005)
    assert color.metrics["vqa_accuracy"] == pytest.approx(200 / 3)


def test_vqa_accuracy_with_many_and_few_references():
    ten = ["cat"] * 3 + ["dog"] * 7
    # Leave-one-out over 10: 3 of the 10 subsets lose a "cat" (2/3 each), 7 keep all three (1 each).
    assert score_example("cat", ex("answer en what?", ten))["vqa_accuracy"] == pytest.approx((3 * 2 / 3 + 7) / 10)
    # Three references are annotator votes: 2 of 3 agree.
    assert score_example("cat", ex("answer en what?", ["cat", "cat", "dog"]))["vqa_accuracy"] == pytest.approx(2 / 3)
    # One or two references are acceptable answers: any match counts in full.
    assert score_example("two", ex("answer en how many?", ["2", "3"])) == {"exact_match": 1.0, "vqa_accuracy": 1.0}
    result = score(["cat", "two", "fish"], [ex("answer en a?", ten), ex("answer en b?", ["2"]), ex("answer en c?", ["cat"])])
    assert result["vqa"].metrics["vqa_accuracy"] == pytest.approx(100 * (0.9 + 1 + 0) / 3)
    assert result["vqa"].metrics["exact_match"] == pytest.approx(200 / 3)


# --- captions ---------------------------------------------------------------------------------


def test_captions_match_the_caption_metrics():
    preds = ["A red circle.", "a blue square and a circle", "a green triangle"]
    refs = [["a red circle"], ["a blue square and a red circle", "a square and a circle"], ["a yellow triangle"]]
    result = score(preds, [ex("caption en", r, task="caption") for r in refs])["caption"]
    assert result.n == 3
    assert result.metrics["exact_match"] == pytest.approx(100 / 3)  # case and full stop do not count
    assert result.metrics["bleu4"] == pytest.approx(corpus_bleu(preds, refs))
    assert result.metrics["cider"] == pytest.approx(cider_d(preds, refs))
    assert result.metrics["cider"] > 0


# --- detection --------------------------------------------------------------------------------


def test_detection_one_good_box_and_one_wrong_label():
    examples = [
        ex("detect circle", box(0, 0, 500, 500, "circle"), task="detect"),
        ex("detect square", box(100, 100, 600, 600, "square"), task="detect"),
    ]
    # First: same label, 500 x 300 inside 500 x 500 -> IoU 0.6. Second: right place, wrong label.
    preds = [box(0, 0, 500, 300, "circle"), box(100, 100, 600, 600, "circle")]
    result = score(preds, examples, [SIZE, (640, 480)])["detect"]
    assert result.metrics == pytest.approx({"accuracy": 50.0, "precision": 50.0, "recall": 50.0, "mean_iou": 60.0})
    assert score_example(preds[0], examples[0], SIZE) == {"accuracy": 1.0, "matched": 1, "predicted": 1, "ground_truth": 1}


def test_detect_accuracy_needs_every_box_and_no_extra():
    two = box(0, 0, 400, 400, "cat") + " ; " + box(500, 500, 900, 900, "dog")
    examples = [ex("detect cat ; dog", two)] * 3
    preds = [
        two,                                              # exact
        box(0, 0, 400, 400, "cat"),                       # misses the dog
        two + " ; " + box(0, 500, 300, 900, "cat"),       # an extra box
    ]
    result = score(preds, examples, [SIZE] * 3)["detect"]
    assert result.metrics["accuracy"] == pytest.approx(100 / 3)
    assert result.metrics["precision"] == pytest.approx(100 * 5 / 6)  # 5 matched of 2 + 1 + 3 predicted
    assert result.metrics["recall"] == pytest.approx(100 * 5 / 6)  # 5 matched of 6 references
    assert result.metrics["mean_iou"] == pytest.approx(100.0)


def test_detection_with_several_references_takes_the_best_one():
    refs = [box(0, 0, 500, 500, "cat"), box(500, 500, 1000, 1000, "cat")]
    example = ex("detect cat", refs)
    assert score_example(box(500, 500, 1000, 1000, "cat"), example, SIZE)["accuracy"] == 1.0
    assert score_example(box(0, 600, 400, 1000, "cat"), example, SIZE)["accuracy"] == 0.0


def test_detection_reads_the_image_size_when_not_given(tmp_path):
    image = tmp_path / "wide.png"
    Image.new("RGB", (200, 100)).save(image)
    example = ex("detect cat", box(0, 0, 500, 500, "cat"), image=image)
    assert score([box(0, 0, 500, 300, "cat")], [example])["detect"].metrics["mean_iou"] == pytest.approx(60.0)
    with pytest.raises(PaliGemmaError, match="cannot read image"):
        score_example("", ex("detect cat", "x", image=tmp_path / "missing.png"))


def test_select_examples_by_task_and_limit():
    examples = [ex("answer en a?", "x", task="color"), ex("caption en", "y", task="caption"),
                ex("answer en b?", "z", task="color")]
    assert select_examples(examples, ["color"], limit=1) == examples[:1]
    assert select_examples(examples, (), limit=None) == examples
    with pytest.raises(PaliGemmaError, match="this dataset has color, caption"):
        select_examples(examples, ["count"])


# --- the command ------------------------------------------------------------------------------


def eval_app():
    """The real app once `eval` is registered as an entry point, else a stand-in with just it."""
    from paligemma_cli.cli import app, friendly_errors

    if any(c.name == "eval" for c in app.registered_commands):
        return app
    from paligemma_cli.commands.eval import eval_command

    local = typer.Typer()
    local.callback()(lambda: None)  # keeps `eval` a subcommand, as in the real app
    local.command("eval")(friendly_errors(eval_command))
    return local


def run(*args):
    return runner.invoke(eval_app(), ["eval", *map(str, args)])




@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


# (prefix, references, task, what the fake model says)
ROWS = [
    ("answer en what color is the circle?", "red", "color", "red"),
    ("answer en what color is the square?", "blue", "color", "green"),
    ("answer en what color is the triangle?", "green", "color", "green"),
    ("answer en how many shapes are there?", ["2"], "count", "two"),
    ("caption en", "a red circle and a blue square", "caption", "A red circle and a blue square."),
    ("describe en", "a blue square", "caption", "a green square"),
    ("detect circle", box(0, 0, 500, 500, "circle"), "detect", box(0, 0, 500, 300, "circle")),
]


def write_dataset(folder: Path, rows=ROWS, broken_images=()) -> Path:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (prefix, suffix, task, _) in enumerate(rows):
        name = f"images/{i}.png"
        if i in broken_images:
            (folder / name).write_bytes(b"not a png")
        else:
            Image.new("RGB", (64, 48), (30 * i, 100, 200)).save(folder / name)
        lines.append(json.dumps({"image": name, "prefix": prefix, "suffix": suffix, "task": task}))
    data = folder / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")
    return data


@pytest.fixture
def fake_model(monkeypatch):
    answers = {prefix: said for prefix, _, _, said in ROWS}
    calls = []

    def fake_generate(self, images, prompts, opts):
        calls.append(len(prompts))
        return [answers[p] for p in prompts]

    monkeypatch.setattr(Pipeline, "generate", fake_generate)
    return calls


def test_eval_json_reports_exact_numbers(ckpt, tmp_path, fake_model):
    data = write_dataset(tmp_path, broken_images={5})
    preds = tmp_path / "preds.jsonl"
    result = run(data, "--model", ckpt, "--json", "--batch-size", 3, "--predictions", preds, "--dtype", "fp32")
    assert result.exit_code == 0, result.output
    assert fake_model == [3, 2, 1]  # batches of 3; the unreadable image (index 5) is left out of the second
    obj = json.loads(result.stdout)
    assert obj["model"] == str(ckpt) and obj["data"] == str(data)
    assert obj["n"] == 6 and obj["skipped"] == 1
    assert obj["tasks"] == {
        "color": {"exact_match": 66.67, "vqa_accuracy": 66.67, "n": 3},
        "count": {"exact_match": 100.0, "vqa_accuracy": 100.0, "n": 1},
        "caption": {"exact_match": 100.0, "bleu4": pytest.approx(100.0), "cider": 0.0, "n": 1},
        "detect": {"accuracy": 100.0, "precision": 100.0, "recall": 100.0, "mean_iou": 60.0, "n": 1},
    }
    assert "skipped: cannot read image" in result.stderr and "1 skipped" in result.stderr

    records = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(records) == len(ROWS)
    assert [r["prediction"] for r in records] == [r[3] if i != 5 else None for i, r in enumerate(ROWS)]
    assert records[1]["score"] == {"exact_match": 0.0, "vqa_accuracy": 0.0}
    assert records[3]["references"] == ["2"] and records[3]["task"] == "count"
    assert records[5]["error"].startswith("cannot read image") and records[5]["score"] == {}
    assert records[6]["image"].endswith("6.png") and records[6]["score"]["accuracy"] == 1.0


def test_eval_table_task_filter_and_limit(ckpt, tmp_path, fake_model):
    data = write_dataset(tmp_path)
    result = run(data, "--model", ckpt, "--task", "color", "--task", "detect", "--limit", 3, "--dtype", "fp32")
    assert result.exit_code == 0, result.output
    assert "color" in result.stdout and "66.67" in result.stdout and "detect" not in result.stdout
    assert "evaluated 3 example(s)" in result.stderr and "evaluated" not in result.stdout


def test_eval_runs_the_real_model(ckpt, tmp_path):
    data = write_dataset(tmp_path, ROWS[:2])
    result = run(data, "--model", ckpt, "--json", "--max-tokens", 3, "--device", "cpu", "--dtype", "fp32")
    assert result.exit_code == 0, result.output
    obj = json.loads(result.stdout)
    assert obj["n"] == 2 and set(obj["tasks"]["color"]) == {"exact_match", "vqa_accuracy", "n"}


def test_eval_errors(ckpt, tmp_path, fake_model):
    data = write_dataset(tmp_path)
    lines = data.read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(lines[0] + "\n{not json\n")
    one_line_error(run(bad, "--model", ckpt), "bad.jsonl:2:")

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    one_line_error(run(empty, "--model", ckpt), "no examples to evaluate")
    one_line_error(run(data, "--model", ckpt, "--task", "ocr"), "no examples of task 'ocr'")

    unreadable = write_dataset(tmp_path / "broken", ROWS[:2], broken_images={0, 1})
    result = run(unreadable, "--model", ckpt, "--dtype", "fp32")
    assert result.exit_code == 1 and result.stdout == ""
    assert "error: " in result.stderr and "no usable example" in result.stderr
    assert fake_model == []
