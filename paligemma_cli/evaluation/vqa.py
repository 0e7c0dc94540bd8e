"""VQA answer normalisation and the VQA accuracy.

Reference: the official VQA evaluation script, `vqaEval.py` (GT-Vision-Lab/VQA,
PythonEvaluationTools/vqaEvaluation), described at https://visualqa.org/evaluation.html, and
big_vision's `evaluators/proj/paligemma/transfers/vqav2.py`, which follows it. The rules, quirks
included, are the official ones; the code is ours.

Accuracy of one question: an answer is fully right once 3 annotators gave it. With the usual 10
answers the official score averages `min(1, matches / 3)` over the 10 ways of leaving one annotator
out: 3 matching annotators give 0.9, 2 give 0.6, 4 or more give 1.0.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# Dropped, or turned into a space, by the punctuation rule below. Apostrophes, colons and full
# stops are not here: contractions keep their apostrophe, and full stops have their own rule.
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
          ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# A full stop not followed by a digit, so "2.5" keeps its point. (The original pattern starts with
# `(?!<=\d)`, a mistyped lookbehind that never matches anything, so "5." loses its point too.)
_PERIOD = re.compile(r"\.(?!\d)")

_ARTICLES = frozenset({"a", "an", "the"})
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
# The official map, minus its four keys with a capital I ("Im", "Ive", "Id've", "I'dve"): words are
# lowercased before the lookup, so those never fire there either. "somebody'd" -> "somebodyd" runs
# the wrong way in the original; it is kept so that scores match.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}


def _strip_punctuation(text: str) -> str:
    # The official rule: a mark next to a space ("cat , dog") is deleted, a mark inside a word
    # ("black-white") becomes a space. If the answer holds a digit-comma-digit anywhere, every mark
    # is deleted instead, so "1,000" becomes "1000" (and, as a side effect, "a-b" becomes "ab").
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _PUNCT:
        if delete_all or f"{mark} " in text or f" {mark}" in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out)


def normalize_vqa_answer(text: str) -> str:
    """The official VQA answer normalisation.

    Whitespace to single spaces, punctuation (see `_strip_punctuation`), lowercase, number words
    up to ten to digits, articles removed, missing apostrophes restored ("dont" -> "don't").
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    words = []
    for word in _strip_punctuation(text).lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction against the annotators' answers, in [0, 1].

    With 10 or more answers (VQAv2 has 10) this is the official leave-one-out score: the mean, over
    each answer left out, of `min(1, matches among the rest / 3)`. With fewer answers (other
    datasets, hand-made sets) leaving one out would make a perfect score unreachable, so it is
    `min(1, matches / 3)` over all of them.

    Both sides are normalised. (The official script normalises the ground truth only when the
    annotators disagree, and big_vision then normalises neither side; VQAv2's answers are already
    normalised, so this changes nothing there and avoids surprises with raw answers elsewhere.)
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    pred = normalize_vqa_answer(prediction)
    matches = [normalize_vqa_answer(a) == pred for a in answers]
    if len(matches) < 10:
        return min(1.0, sum(matches) / 3)
    total = sum(matches)
    # Leaving out answer i removes one match exactly when answer i matched.
    return sum(min(1.0, (total - m) / 3) for m in matches) / len(matches)


def exact_match(prediction: str, references: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised reference, else 0.0."""
    if isinstance(references, str):
        references = [references]
    pred = normalize_vqa_answer(prediction)
    return float(any(normalize_vqa_answer(r) == pred for r in references))
