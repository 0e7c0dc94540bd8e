"""SigLIP's text side: canonicalise, SentencePiece, append `</s>`, pad to a fixed length.

References: `transformers`' `SiglipTokenizer` (`canonicalize_text`: punctuation removed, whitespace
collapsed, lowercased; `</s>` appended; `padding="max_length"` with `</s>` as the pad token) and
big_vision's `pp/proj/image_text` text preprocessing. The spec's "SigLIP and CLIP dual encoders" section
explains why the padding length matters: the text tower pools the last position, so a text padded
differently is a different input.

Real SigLIP checkpoints ship `spiece.model` (T5 layout: 0 `<pad>`, 1 `</s>`, 2 `<unk>`); the trainer in
this package writes `tokenizer.model` with the same layout (`train_siglip_tokenizer`).
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Sequence
from pathlib import Path

from paligemma_cli.errors import PaliGemmaError

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
        import sentencepiece as spm

        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise PaliGemmaError(f"tokenizer file '{path}' not found") from None
        except OSError as e:
            raise PaliGemmaError(f"cannot read tokenizer file '{path}': {e.strerror or e}") from None
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(data)
        except (RuntimeError, OSError, TypeError):
            raise PaliGemmaError(f"cannot read tokenizer file '{path}': not a SentencePiece model") from None
        return cls(sp, max_length, pad_id, eos_id, path)

    @classmethod
    def from_folder(cls, folder: str | Path, text_config) -> "SiglipTokenizer":
        """The folder's tokenizer, padding to the text tower's positions with the config's pad and eos ids."""
        folder = Path(folder)
        for name in TOKENIZER_FILES:
            if (folder / name).is_file():
                tok = cls.from_file(folder / name, text_config.max_position_embeddings,
                                    text_config.pad_token_id, text_config.eos_token_id)
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
        import torch

        out = torch.full((len(texts), self.max_length), self.pad_id, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = self.encode(text)
            out[i, : len(ids)] = torch.tensor(ids)
        return out


def train_siglip_tokenizer(texts: Iterable[str], out_path: str | Path, vocab_size: int = 1000) -> Path:
    """Train a BPE SentencePiece model on canonicalised `texts`, in SigLIP's layout, and write it.

    Layout: 0 `<pad>`, 1 `</s>`, 2 `<unk>`, no `<bos>` (as `google/siglip-*`'s `spiece.model`).
    BPE, not the unigram model SigLIP's own file holds: on a small, repetitive corpus such as the shapes
    captions, the unigram trainer stopped at 30 pieces, split "yellow" into letters and mapped "h" and
    "f" to `<unk>` ("left" and "the" lost letters); BPE learns every word as one piece. The file format
    and the layout are the same either way.
    `vocab_size` is an upper bound: a small corpus yields fewer pieces instead of failing.
    The same texts always give the same file.
    """

    lines = [line for line in (canonicalize(t) for t in texts) if line]
    if not lines:
        raise PaliGemmaError("cannot train a tokenizer: the captions are empty once punctuation is removed")
    from paligemma_cli.training.tokenizer_training import run_sentencepiece_trainer

    model = run_sentencepiece_trainer(
        lines, model_type="bpe", vocab_size=vocab_size, hard_vocab_limit=False, character_coverage=1.0,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        num_threads=1, shuffle_input_sentence=False,  # determinism
    )
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(model)
    return out_path
