"""SigLIP's text side: canonicalise, SentencePiece, append `</s>`, pad to a fixed length.

References: `transformers`' `SiglipTokenizer` (`canonicalize_text`: punctuation removed, whitespace
collapsed, lowercased; `</s>` appended; `padding="max_length"` with `</s>` as the pad token) and
big_vision's `pp/proj/image_text` text preprocessing. The padding length matters: the text tower pools
the last position, so a text padded differently is a different input.

Real SigLIP checkpoints ship `spiece.model` (T5 layout: 0 `<pad>`, 1 `</s>`, 2 `<unk>`); the trainer in
this package writes `tokenizer.model` with the same layout (`training/tokenizer_training.py`).
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from pathlib import Path

import torch

from paligemma_cli.errors import PaliGemmaError
from paligemma_cli.processing.tokenizer import load_sentencepiece

# Looked for in this order: what this package writes, then what `google/siglip-*` ships.
TOKENIZER_FILES = ("tokenizer.model", "spiece.model")

_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


def canonicalize(text: str) -> str:
    """Lowercase, drop ASCII punctuation, collapse whitespace: "A red circle, too!" -> "a red circle too"."""
    return " ".join(text.lower().translate(_NO_PUNCTUATION).split())


class SiglipTokenizer:
    """Texts -> (B, max_length) ids: canonicalised, truncated to leave room for `</s>`, padded at the end."""

    def __init__(self, sp, max_length: int = 64, pad_id: int = 1, eos_id: int = 1, path: Path | None = None):
        """Wrap a loaded `sentencepiece.SentencePieceProcessor`; use `from_file` / `from_folder`."""
        if max_length < 2:
            raise PaliGemmaError(f"texts need at least 2 positions (a token and </s>), got max_length {max_length}")
        self.sp, self.max_length, self.pad_id, self.eos_id, self.path = sp, max_length, pad_id, eos_id, path

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @classmethod
    def from_file(cls, path: str | Path, max_length: int = 64, pad_id: int = 1, eos_id: int = 1) -> "SiglipTokenizer":
        """Load a SentencePiece model file; a missing or unreadable file is a PaliGemmaError."""
        return cls(load_sentencepiece(path), max_length, pad_id, eos_id, Path(path))

    @classmethod
    def from_folder(cls, folder: str | Path, text_config) -> "SiglipTokenizer":
        """The folder's tokenizer, padding to the text tower's positions.

        `</s>` ends and pads a text, as `transformers`' `SiglipTokenizer` does, and its id comes from the
        tokenizer itself: a `config.json` written by `transformers` carries its CLIP-sized defaults
        (`eos_token_id: 49407`), which `transformers` never uses for SigLIP and which lie outside the
        embedding table of a 32k vocabulary.
        """
        folder = Path(folder)
        for name in TOKENIZER_FILES:
            if (folder / name).is_file():
                sp = load_sentencepiece(folder / name)
                eos = sp.eos_id() if sp.eos_id() >= 0 else sp.piece_to_id("</s>")
                if eos < 0 or sp.id_to_piece(eos) != "</s>":
                    raise PaliGemmaError(f"'{folder / name}' has no </s> piece: it is not a SigLIP tokenizer")
                tok = cls(sp, text_config.max_position_embeddings, eos, eos, folder / name)
                if tok.vocab_size > text_config.vocab_size:
                    raise PaliGemmaError(f"'{folder / name}' has {tok.vocab_size} pieces but the model only "
                                         f"{text_config.vocab_size} embeddings: it belongs to another model")
                return tok
        raise PaliGemmaError(f"'{folder}' has no tokenizer ({' or '.join(TOKENIZER_FILES)}); "
                             "copy the one that came with the weights there")

    def encode(self, text: str) -> list[int]:
        """One text -> ids ending in `</s>`, at most `max_length` of them (longer texts lose their end)."""
        ids = self.sp.encode(canonicalize(text))[: self.max_length - 1]
        return ids + [self.eos_id]

    def __call__(self, texts: Sequence[str]):
        """(B,) texts -> LongTensor (B, max_length), right-padded with `pad_id`."""
        out = torch.full((len(texts), self.max_length), self.pad_id, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = self.encode(text)
            out[i, : len(ids)] = torch.tensor(ids)
        return out
