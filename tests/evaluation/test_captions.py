"""BLEU-4 and CIDEr-D: hand-computed cases, and agreement with coco-caption's own scorers."""

import math
import random

import pytest

from paligemma_cli.evaluation.captions import cider_d, corpus_bleu, tokenize_caption

# Image 1: hypothesis of 6 words against references of 7 and 5 words.
HYP_1 = "a man is riding a horse"
REFS_1 = ["a man is riding a brown horse", "a person rides a horse"]
# Image 2: a 2-word hypothesis, one 5-word reference.
HYP_2 = "a dog"
REFS_2 = ["a dog runs on grass"]


def test_bleu_by_hand_single_caption():
    # Clipped matches / possible n-grams:
    #   1-grams: a(x2, refs have 2), man, is, riding, horse          -> 6/6
    #   2-grams: a man, man is, is riding, riding a, a horse           -> 5/5
    #   3-grams: a man is, man is riding, is riding a | riding a horse -> 3/4
    #   4-grams: a man is riding, man is riding a | is riding a horse  -> 2/3
    # Reference length: 7 and 5 are both 1 away from 6; the shorter (5) wins, so no brevity penalty.
    # BLEU-4 = (1 * 1 * 3/4 * 2/3) ** (1/4) = 0.5 ** 0.25
    assert corpus_bleu([HYP_1], [REFS_1]) == pytest.approx(100 * 0.5**0.25, abs=1e-6)
    # BLEU-2 = (1 * 1) ** (1/2)
    assert corpus_bleu([HYP_1], [REFS_1], max_n=2) == pytest.approx(100.0, abs=1e-6)


def test_bleu_by_hand_corpus_with_brevity_penalty():
    # Image 2 adds 2/2 unigrams and 1/1 bigrams, and no 3- or 4-grams, so the corpus precisions are
    # 8/8, 6/6, 3/4, 2/3 as before. Lengths: hypotheses 6 + 2 = 8, references 5 + 5 = 10,
    # ratio 0.8 < 1, so BP = exp(1 - 1/0.8) = exp(-0.25).
    want = 100 * 0.5**0.25 * math.exp(-0.25)
    assert corpus_bleu([HYP_1, HYP_2], [REFS_1, REFS_2]) == pytest.approx(want, abs=1e-6)


def test_cider_d_by_hand():
    # Two images, so log(#images) = ln 2 =: L. IDF = L - ln(df): "a" is in both images' references
    # (IDF 0); every other reference n-gram is in one (IDF L); an n-gram in no reference gets L too.
    #
    # Image A: "cat cat" vs "a cat". 1-grams: hyp {cat: 2L}, ref {a: 0, cat: L}.
    #   Clipped dot = min(2L, L) * L = L^2; norms 2L and L -> 1/2.
    #   2-grams: hyp {cat cat: L} shares nothing with ref {a cat: L} -> 0. 3-, 4-grams: none -> 0.
    #   Lengths 2 and 2 words -> no penalty. Score = 10 * (1/2 + 0 + 0 + 0) / 4 = 1.25.
    # Image B: "a dog runs" vs "a dog". 1-grams: hyp {a: 0, dog: L, runs: L}, ref {a: 0, dog: L}:
    #   dot L^2, norms sqrt(2) L and L -> 1/sqrt(2). 2-grams: hyp {a dog: L, dog runs: L}, ref
    #   {a dog: L} -> 1/sqrt(2). 3-grams: the reference has none -> 0.
    #   Lengths 3 and 2 words -> penalty exp(-1 / (2 * 6^2)).
    #   Score = 10 * (2/sqrt(2)) / 4 * exp(-1/72).
    score_a = 1.25
    score_b = 10 * (2 / math.sqrt(2)) / 4 * math.exp(-1 / 72)
    got = cider_d(["cat cat", "a dog runs"], [["a cat"], ["a dog"]])
    assert got == pytest.approx(100 * (score_a + score_b) / 2, abs=1e-6)


def test_cider_d_identical_short_captions_and_single_image():
    # Perfect 1- and 2-gram agreement, no 3- or 4-grams: 10 * (1 + 1 + 0 + 0) / 4 = 5 per image.
    assert cider_d(["a cat", "a dog"], [["a cat"], ["a dog"]]) == pytest.approx(500.0)
    # With one image every reference n-gram has IDF log(1) - log(1) = 0.
    assert cider_d(["a cat"], [["a cat"]]) == 0.0


@pytest.mark.parametrize(
    "text, want",
    [
        ("A man riding a horse.", ["a", "man", "riding", "a", "horse"]),
        ("Two dogs, playing!", ["two", "dogs", "playing"]),
        ("The dog's ball isn't red", ["the", "dog", "'s", "ball", "is", "n't", "red"]),
        ("A black-and-white photo (old)", ["a", "black-and-white", "photo", "old"]),
        ('He said "hi"... ok', ["he", "said", "hi", "ok"]),
        ("It costs $2.50", ["it", "costs", "$", "2.50"]),
    ],
)
def test_tokenizer_approximates_ptb(text, want):
    assert tokenize_caption(text) == want


def test_tokenisation_is_applied():
    assert corpus_bleu(["A Dog."], [["a dog"]], max_n=2) == pytest.approx(100.0)


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        corpus_bleu(["a"], [])
    with pytest.raises(ValueError):
        cider_d(["a"], [[]])
    with pytest.raises(ValueError):
        cider_d([], [])


def _random_corpus(seed, num_images=40):
    # A small vocabulary so that higher-order n-grams match often enough to matter.
    rng = random.Random(seed)
    vocab = "a the cat dog man on of red big sits runs grass".split()

    def sentence():
        return [rng.choice(vocab) for _ in range(rng.randint(1, 12))]

    predictions = [" ".join(sentence()) for _ in range(num_images)]
    references = [
        [" ".join(sentence()) for _ in range(rng.randint(1, 5))] for _ in range(num_images)
    ]
    # Every fourth prediction is a reference with one word changed, so long n-grams match too.
    for i in range(0, num_images, 4):
        words = sentence() + sentence()
        references[i][0] = " ".join(words)
        words[rng.randrange(len(words))] = rng.choice(vocab)
        predictions[i] = " ".join(words)
    predictions[1] = ""  # empty captions must not trip either scorer
    return predictions, references


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_pycocoevalcap(seed):
    bleu_mod = pytest.importorskip("pycocoevalcap.bleu.bleu")
    cider_mod = pytest.importorskip("pycocoevalcap.cider.cider")
    predictions, references = _random_corpus(seed)
    # Already-tokenised strings: both sides then split on whitespace only.
    gts = {i: refs for i, refs in enumerate(references)}
    res = {i: [pred] for i, pred in enumerate(predictions)}

    bleus, _ = bleu_mod.Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(1, 5):
        ours = corpus_bleu(predictions, references, max_n=n, tokenize=False) / 100
        assert ours == pytest.approx(bleus[n - 1], abs=1e-6)
    assert bleus[3] > 0.01  # the corpus must exercise 4-gram matches for the check to mean much

    # coco-caption's `Cider` is CIDEr-D (clipping, sigma-6 length penalty, x10; see module docs).
    cider, _ = cider_mod.Cider().compute_score(gts, res)
    ours = cider_d(predictions, references, tokenize=False) / 100
    assert ours == pytest.approx(float(cider), abs=1e-6)
