"""Caption metrics as the COCO caption papers report them: corpus BLEU-4 and CIDEr-D.

References:
- coco-caption (tylin/coco-caption, packaged as `pycocoevalcap`): `bleu/bleu_scorer.py` and
  `cider/cider_scorer.py`. The numbers here match those scorers to 1e-6 on the same tokens.
- BLEU: Papineni et al., 2002. CIDEr and CIDEr-D: Vedantam et al., 2015 (arXiv:1411.5726).
  coco-caption's class is called `Cider` but computes CIDEr-D: clipped n-gram weights, a Gaussian
  length penalty (sigma 6), and a factor 10; document frequencies come from the references of the
  images being scored.

Scores are on the papers' scale: BLEU x 100, CIDEr x 100 (coco-caption returns 0..1 and 0..10).

Tokenisation: coco-caption runs Stanford's PTBTokenizer (Java), lowercased, then drops punctuation
tokens. `tokenize_caption` approximates it in Python: it lowercases, splits clitics as PTB does
("don't" -> "do n't", "dog's" -> "dog 's"), keeps hyphenated words and numbers like "2.5" whole, and
drops the punctuation coco-caption drops. It differs from PTB on rarer things (abbreviations such
as "u.s.", URLs, some quote and symbol handling), so scores can move slightly against the official
pipeline on text that has them; pass `tokenize=False` to score text already tokenised elsewhere.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

# Splits off the clitics PTB separates: "can't" -> "ca n't", "it's" -> "it 's".
_CLITIC = re.compile(r"(?<=\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
_TOKEN = re.compile(
    r"n't|'(?:s|re|ve|ll|d|m)\b"  # clitics split off above
    r"|\d+(?:[.,]\d+)+"  # numbers with a point or thousands comma
    r"|\w+(?:[-']\w+)*"  # words, hyphenated words, "o'clock"
    r"|\S"  # any other symbol, one character at a time
)
# What coco-caption removes after PTB tokenisation (PTB turns brackets into -LRB- etc. and quotes
# into `` and '', all of which are on coco-caption's list).
_DROPPED = frozenset(".,?!:;-'\"`()[]{}")


def tokenize_caption(text: str) -> list[str]:
    """Lowercased word tokens without punctuation, approximating coco-caption's PTBTokenizer."""
    text = _CLITIC.sub(r" \1", text.lower())
    return [t for t in _TOKEN.findall(text) if t not in _DROPPED]


def _tokens(text: str, tokenize: bool) -> list[str]:
    return tokenize_caption(text) if tokenize else text.split()


def _ngrams(tokens: list[str], max_n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for n in range(1, max_n + 1)
                   for i in range(len(tokens) - n + 1))


def _check(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference sets")
    if not predictions:
        raise ValueError("no captions to score")
    if any(len(refs) == 0 for refs in references):
        raise ValueError("every prediction needs at least one reference caption")


def corpus_bleu(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    max_n: int = 4,
    tokenize: bool = True,
) -> float:
    """Corpus BLEU-`max_n` x 100, as coco-caption's `Bleu(4)` reports it.

    Counts are summed over the corpus before the precisions are taken. The reference length of
    each caption is the reference length closest to it (the shorter one on a tie), and the brevity
    penalty compares the summed lengths. Not smoothed beyond coco-caption's 1e-15 / 1e-9 guards,
    so a corpus without a single matching 4-gram scores about 0.
    """
    _check(predictions, references)
    matched = [0] * max_n
    possible = [0] * max_n
    hyp_len = ref_len = 0
    for prediction, refs in zip(predictions, references):
        hyp = _tokens(prediction, tokenize)
        ref_tokens = [_tokens(r, tokenize) for r in refs]
        hyp_len += len(hyp)
        ref_len += min((abs(len(r) - len(hyp)), len(r)) for r in ref_tokens)[1]
        # Clipping: an n-gram counts at most as often as it occurs in any single reference.
        max_ref_counts: Counter = Counter()
        for r in ref_tokens:
            max_ref_counts |= _ngrams(r, max_n)
        for gram, count in _ngrams(hyp, max_n).items():
            matched[len(gram) - 1] += min(count, max_ref_counts[gram])
        for n in range(max_n):
            possible[n] += max(0, len(hyp) - n)

    # coco-caption adds these to keep log(0) and 0/0 away; kept so the numbers match it exactly.
    tiny, small = 1e-15, 1e-9
    log_precision = sum(math.log((m + tiny) / (p + small)) for m, p in zip(matched, possible))
    bleu = math.exp(log_precision / max_n)
    ratio = (hyp_len + tiny) / (ref_len + small)
    if ratio < 1:
        bleu *= math.exp(1 - 1 / ratio)
    return 100 * bleu


def cider_d(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    tokenize: bool = True,
    n: int = 4,
    sigma: float = 6.0,
) -> float:
    """Corpus CIDEr-D x 100, as coco-caption's `Cider` computes it.

    Per image: for each n-gram order, the cosine similarity of TF-IDF vectors of the prediction and
    each reference, with the prediction's weights clipped at the reference's and a penalty
    exp(-(length difference)^2 / (2 sigma^2)); averaged over orders and references, times 10. The
    IDF is log(#images / #images whose references contain the n-gram), so it depends on the whole
    set being scored, and a single image always scores 0.
    """
    _check(predictions, references)
    hyps = [_ngrams(_tokens(p, tokenize), n) for p in predictions]
    refs = [[_ngrams(_tokens(r, tokenize), n) for r in rs] for rs in references]

    doc_freq: Counter = Counter()
    for image_refs in refs:
        doc_freq.update(set().union(*image_refs))
    log_images = math.log(len(refs))

    def tfidf(counts: Counter) -> tuple[list[dict], list[float], int]:
        vectors: list[dict] = [{} for _ in range(n)]
        for gram, tf in counts.items():
            # An n-gram no reference has gets the IDF of one that a single image has.
            vectors[len(gram) - 1][gram] = tf * (log_images - math.log(max(1.0, doc_freq[gram])))
        norms = [math.sqrt(sum(w * w for w in v.values())) for v in vectors]
        # Length in words. (coco-caption counts bigrams, words - 1, by an off-by-one; differences
        # are the same, and where a caption is empty every similarity is 0 anyway.)
        length = sum(tf for gram, tf in counts.items() if len(gram) == 1)
        return vectors, norms, length

    scores = []
    for hyp_counts, image_refs in zip(hyps, refs):
        hyp_vecs, hyp_norms, hyp_len = tfidf(hyp_counts)
        total = 0.0
        for ref_counts in image_refs:
            ref_vecs, ref_norms, ref_len = tfidf(ref_counts)
            penalty = math.exp(-((hyp_len - ref_len) ** 2) / (2 * sigma**2))
            for k in range(n):
                dot = sum(min(w, ref_vecs[k].get(g, 0.0)) * ref_vecs[k].get(g, 0.0)
                          for g, w in hyp_vecs[k].items())
                if hyp_norms[k] and ref_norms[k]:
                    dot /= hyp_norms[k] * ref_norms[k]
                total += dot * penalty
        scores.append(10 * total / n / len(image_refs))
    return 100 * sum(scores) / len(scores)
