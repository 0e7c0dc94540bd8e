"""VQA normalisation on the official script's cases, and the leave-one-out accuracy by hand."""

import pytest

from paligemma_cli.evaluation.vqa import exact_match, normalize_vqa_answer, vqa_accuracy


@pytest.mark.parametrize(
    "raw, want",
    [
        ("Two", "2"),
        ("none", "0"),
        ("the cat.", "cat"),
        ("A Dog\n", "dog"),
        ("an apple", "apple"),
        ("dont", "don't"),
        ("it's", "it's"),  # apostrophes are not punctuation here
        ("Hello!", "hello"),  # mark touching no space: becomes a space, then stripped
        ("yes , no", "yes no"),  # mark next to a space: deleted
        ("black-and-white", "black and white"),
        ("2.5", "2.5"),  # a point before a digit stays
        ("5.", "5"),
        ("1,000", "1000"),
        # Digit-comma-digit anywhere makes every mark vanish, hyphens included (official quirk).
        ("red-blue 1,2", "redblue 12"),
        ("  ten  ", "10"),
    ],
)
def test_normalisation_matches_the_official_rules(raw, want):
    assert normalize_vqa_answer(raw) == want


@pytest.mark.parametrize(
    "num_matching, want",
    # Ten answers, k of them match. Leaving out a matching one leaves k-1, else k:
    # acc = (k * min(1, (k-1)/3) + (10-k) * min(1, k/3)) / 10
    [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)],
)
def test_leave_one_out_accuracy_by_hand(num_matching, want):
    answers = ["cat"] * num_matching + ["dog"] * (10 - num_matching)
    assert vqa_accuracy("cat", answers) == pytest.approx(want)


def test_fewer_than_ten_answers_use_all_of_them():
    assert vqa_accuracy("cat", ["cat", "cat", "dog"]) == pytest.approx(2 / 3)
    assert vqa_accuracy("cat", ["cat", "cat", "cat"]) == 1.0
    assert vqa_accuracy("cat", ["dog"]) == 0.0
    with pytest.raises(ValueError):
        vqa_accuracy("cat", [])


def test_accuracy_normalises_both_sides():
    assert vqa_accuracy("Two.", ["2"] * 10) == 1.0
    assert vqa_accuracy("2", ["two"] * 3) == 1.0


def test_exact_match():
    assert exact_match("The Cat.", ["dog", "cat"]) == 1.0
    assert exact_match("cat", "dog") == 0.0
    assert exact_match("dont", "don't") == 1.0
