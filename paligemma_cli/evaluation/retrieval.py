"""Image-text retrieval with a dual encoder: recall@k both ways.

References: the retrieval protocol of CLIP and SigLIP (COCO / Flickr30k image->text and text->image
recall@1/5/10).

What counts as a match: a caption matches an image when it is that image's caption, or the same caption
(after SigLIP's canonicalisation) as the image's own, or the caption of another line with the same image
file. Synthetic data repeats captions ("a red circle" many times), and a COCO-style file repeats the
image once per caption; in both, ranking another right answer first is not a miss.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from paligemma_cli.errors import PaliGemmaError
from paligemma_cli.inference.embeddings import embed_images, embed_texts
from paligemma_cli.processing.image import load_image, preprocess
from paligemma_cli.processing.siglip_tokenizer import canonicalize

KS = (1, 5)


def recall_at_k(scores: torch.Tensor, positives: torch.Tensor | None = None, ks: Sequence[int] = KS) -> dict[int, float]:
    """Fraction of queries (rows) with a right answer among their top k candidates (columns).

    Ties are broken against the query: a wrong candidate scored equal to the best right one ranks
    above it. The answer then depends only on the scores, never on the order of the candidates, and a
    collapsed model (all scores equal) gets no credit.

    Args:
        scores: (Q, C) similarity of every query to every candidate; higher is better.
        positives: (Q, C) bool, True where the candidate is a right answer; None: the diagonal
            (candidate i answers query i; needs Q == C).
        ks: the cut-offs.

    Returns:
        {k: recall in [0, 1]}.
    """
    if positives is None:
        if scores.shape[0] != scores.shape[1]:
            raise ValueError(f"scores are {tuple(scores.shape)}: without positives they must be square")
        positives = torch.eye(scores.shape[0], dtype=torch.bool, device=scores.device)
    if not positives.any(dim=1).all():
        raise ValueError("every query needs at least one right answer")
    best_right = scores.masked_fill(~positives, float("-inf")).amax(dim=1, keepdim=True)  # (Q, 1)
    wrong_above = ((scores >= best_right) & ~positives).sum(dim=1)  # (Q,) wrong answers ranked first
    return {k: (wrong_above < k).float().mean().item() for k in ks}


def retrieval_recall(img_emb: torch.Tensor, txt_emb: torch.Tensor, positives: torch.Tensor | None = None,
                     ks: Sequence[int] = KS) -> dict[str, dict[int, float]]:
    """Image->text and text->image recall@k from embeddings, by cosine similarity.

    Args:
        img_emb: (N_img, D); txt_emb: (N_txt, D), neither normalised (cosine does it).
        positives: (N_img, N_txt) bool; None: image i matches text i only.

    Returns:
        {"image_to_text": {k: recall}, "text_to_image": {k: recall}}, recalls in [0, 1].
    """
    sim = F.normalize(img_emb.float(), dim=-1) @ F.normalize(txt_emb.float(), dim=-1).T  # (N_img, N_txt)
    if positives is None:
        positives = torch.eye(sim.shape[0], sim.shape[1], dtype=torch.bool)
    return {"image_to_text": recall_at_k(sim, positives, ks), "text_to_image": recall_at_k(sim.T, positives.T, ks)}


def match_matrix(examples: list) -> torch.Tensor:
    """(N, N) bool: text j (example j's first reference) is a right answer for image i (see module docstring)."""
    images = [str(ex.image) for ex in examples]
    captions = [canonicalize(ex.references[0]) for ex in examples]
    same_image = torch.tensor([[a == b for b in images] for a in images])
    same_caption = torch.tensor([[a == b for b in captions] for a in captions])
    return same_image | same_caption


@dataclass
class RetrievalReport:
    n: int
    image_to_text: dict[int, float]  # percentages
    text_to_image: dict[int, float]
    skipped: list[str] = field(default_factory=list)  # unreadable image files
    seconds: float = 0.0

    def as_dict(self) -> dict:
        def pct(d):
            return {f"r{k}": round(v, 2) for k, v in d.items()}

        return {"n": self.n, "image_to_text": pct(self.image_to_text), "text_to_image": pct(self.text_to_image),
                "skipped": len(self.skipped)}


def evaluate_retrieval(model, tokenizer, examples: list, batch_size: int = 32,
                       on_progress: Callable[[int], None] | None = None) -> RetrievalReport:
    """Recall@1/5 both ways over `examples` (each one image and its caption `references[0]`).

    Every image is ranked against every caption of the set, and every caption against every image.
    Examples whose image cannot be read are left out of both sides and listed in `skipped`.
    `on_progress(n)` is called after each batch of n examples.
    """
    t0 = time.perf_counter()
    model.eval()
    size = model.config.vision.image_size
    kept, skipped, img_emb, txt_emb = [], [], [], []
    for start in range(0, len(examples), batch_size):
        batch, images = [], []
        for ex in examples[start:start + batch_size]:
            try:
                images.append(load_image(ex.image))
                batch.append(ex)
            except PaliGemmaError:
                skipped.append(str(ex.image))
        if batch:
            img_emb.append(embed_images(model, preprocess(images, size)))
            txt_emb.append(embed_texts(model, tokenizer, [ex.references[0] for ex in batch]))
            kept.extend(batch)
        if on_progress:
            on_progress(len(examples[start:start + batch_size]))
    if not kept:
        raise PaliGemmaError(f"no usable example: all {len(skipped)} image(s) were unreadable")
    recall = retrieval_recall(torch.cat(img_emb), torch.cat(txt_emb), match_matrix(kept))
    return RetrievalReport(
        n=len(kept),
        image_to_text={k: 100 * v for k, v in recall["image_to_text"].items()},
        text_to_image={k: 100 * v for k, v in recall["text_to_image"].items()},
        skipped=skipped, seconds=time.perf_counter() - t0,
    )
