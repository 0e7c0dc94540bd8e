"""Retrieval recall@k worked by hand on small score matrices (ties included), what counts as a match,
and `evaluate_retrieval` with a fake encoder whose embeddings are the images' colours."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from paligemma_cli.commands.eval import format_retrieval
from paligemma_cli.data.jsonl import Example, caption_examples
from paligemma_cli.evaluation.retrieval import evaluate_retrieval, match_matrix, recall_at_k, retrieval_recall


def test_recall_by_hand():
    scores = torch.tensor([
        [0.9, 0.1, 0.2],  # right answer first
        [0.8, 0.5, 0.1],  # one wrong answer above the right one: rank 2
        [0.3, 0.3, 0.3],  # tied with both wrong answers: ranked behind them, rank 3
    ])
    assert recall_at_k(scores, ks=(1, 2, 3)) == pytest.approx({1: 1 / 3, 2: 2 / 3, 3: 1.0})


def test_ties_count_against_the_query_whatever_the_column_order():
    flat = torch.zeros(4, 4)  # a collapsed model: every score equal
    assert recall_at_k(flat, ks=(1, 4)) == {1: 0.0, 4: 1.0}
    scores = torch.tensor([[0.5, 0.5, 0.1], [0.2, 0.7, 0.7], [0.0, 0.0, 0.0]])
    perm = torch.tensor([2, 0, 1])
    positives = torch.eye(3, dtype=torch.bool)
    assert recall_at_k(scores, positives) == recall_at_k(scores[:, perm], positives[:, perm])
    assert recall_at_k(scores, ks=(1, 2)) == pytest.approx({1: 0.0, 2: 2 / 3})


def test_several_right_answers_count_the_best_one():
    scores = torch.tensor([[0.1, 0.9, 0.5], [0.8, 0.2, 0.6]])
    positives = torch.tensor([[True, True, False], [False, True, False]])
    # row 0: its second right answer is first -> hit; row 1: two wrong ones above 0.2 -> rank 3
    assert recall_at_k(scores, positives, ks=(1, 2, 3)) == pytest.approx({1: 0.5, 2: 0.5, 3: 1.0})
    with pytest.raises(ValueError, match="right answer"):
        recall_at_k(scores, torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="square"):
        recall_at_k(scores)


def test_retrieval_recall_both_ways_by_cosine():
    img = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    txt = torch.tensor([[3.0, 0.1], [0.1, 1.0], [-1.0, 0.0]])
    # cos: image 2 (diagonal) prefers text 0 or 1 over text 2; text 2 (pointing away) is last for everyone
    r = retrieval_recall(img, txt, ks=(1, 3))
    assert r["image_to_text"] == pytest.approx({1: 2 / 3, 3: 1.0})
    assert r["text_to_image"] == pytest.approx({1: 2 / 3, 3: 1.0})


def test_same_caption_or_same_image_is_a_match(tmp_path):
    examples = [Example(tmp_path / "a.png", "caption en", "A red circle."),
                Example(tmp_path / "b.png", "caption en", "a red circle"),
                Example(tmp_path / "a.png", "caption en", "a round red thing"),
                Example(tmp_path / "c.png", "caption en", "a blue square")]
    expected = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(match_matrix(examples), expected)
    mixed = examples + [Example(tmp_path / "c.png", "answer en what color?", "blue", task="color")]
    assert caption_examples(mixed) == examples


class ColourEncoder(torch.nn.Module):
    """Image embedding = mean RGB; text embedding = the RGB its tokenizer gave; so colours retrieve colours."""

    class config:  # noqa: N801 - stands for SiglipConfig
        class vision:  # noqa: N801
            image_size = 8

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))  # for next(model.parameters()).device

    def encode_image(self, pixel_values):
        return pixel_values.mean(dim=(2, 3))

    def encode_text(self, ids):
        return ids.float()


RGB = {"red": (1.0, -1.0, -1.0), "green": (-1.0, 1.0, -1.0), "blue": (-1.0, -1.0, 1.0)}


def colour_tokenizer(texts):
    return torch.tensor([RGB[t.split()[-1]] for t in texts])


def test_evaluate_retrieval_with_a_perfect_encoder_and_an_unreadable_image(tmp_path):
    examples = []
    for i, (name, rgb) in enumerate([("red", (255, 0, 0)), ("green", (0, 255, 0)), ("blue", (0, 0, 255))] * 2):
        Image.new("RGB", (8, 8), rgb).save(tmp_path / f"{i}.png")
        examples.append(Example(tmp_path / f"{i}.png", "caption en", f"a {name}"))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    examples.append(Example(tmp_path / "bad.png", "caption en", "a red"))
    seen = []
    report = evaluate_retrieval(ColourEncoder(), colour_tokenizer, examples, batch_size=4, on_progress=seen.append)
    assert report.n == 6 and report.skipped == [str(tmp_path / "bad.png")] and seen == [4, 3]
    # Each colour appears twice: the duplicate caption is also right, so recall@1 is 100 %.
    assert report.image_to_text == {1: 100.0, 5: 100.0} and report.text_to_image == {1: 100.0, 5: 100.0}
    d = report.as_dict()
    assert d == {"n": 6, "image_to_text": {"r1": 100.0, "r5": 100.0}, "text_to_image": {"r1": 100.0, "r5": 100.0},
                 "skipped": 1}
    assert format_retrieval(d).splitlines() == ["image->text  R@1 100.00  R@5 100.00",
                                                "text->image  R@1 100.00  R@5 100.00"]
