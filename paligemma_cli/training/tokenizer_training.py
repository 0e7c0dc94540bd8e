"""Train a small SentencePiece tokenizer laid out like Gemma's, for tests and from-scratch training.

References: google/sentencepiece (`SentencePieceTrainer`, `sentencepiece_model.proto`); transformers'
`GemmaTokenizer` and `PaliGemmaProcessor`. The layout is the one the real PaliGemma
`tokenizer.model` has, so that `transformers` reads a tiny model exactly as it reads the real one:

    0 <pad>  1 <eos>  2 <bos>  3 <unk>  4 <mask>  5 "\\n"  6.. bytes and learned pieces
    then <loc0000>..<loc1023>, <seg000>..<seg127> (USER_DEFINED), and <image> = the next id.

`<mask>` must sit at 4: transformers' GemmaTokenizer adds a `<mask>` when the vocabulary lacks one,
which would shift `<image>` by one. The normalizer is Gemma's: identity, no dummy prefix, spaces kept
as they are, digits split.
"""

from __future__ import annotations

import io
import os
import re
import struct
import sys
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from paligemma_cli.errors import PaliGemmaError
from paligemma_cli.processing.siglip_tokenizer import canonicalize

LOC_TOKENS = [f"<loc{i:04d}>" for i in range(1024)]
SEG_TOKENS = [f"<seg{i:03d}>" for i in range(128)]
_LOC_SEG = re.compile(r"<loc\d{4}>|<seg\d{3}>")


def train_tokenizer(texts: Iterable[str], out_path: str | Path, vocab_size: int = 4096) -> Path:
    """Train a byte-fallback BPE SentencePiece model on `texts` and write it to `out_path`.

    Args:
        texts: training text; each string may hold several lines (each line is one sentence to
            the trainer, "\\n" itself is a fixed piece).
        out_path: the file to write, usually `<folder>/tokenizer.model`.
        vocab_size: pieces learned by the trainer, including the 5 specials, "\\n" and the 256 byte
            pieces; the 1152 `<loc>`/`<seg>` pieces come on top. On a small corpus the trainer may
            stop earlier (the vocabulary is then smaller, never an error).

    Returns:
        `out_path` as a Path. The same texts always give the same file.
    """
    # One sentence per line; empty lines carry nothing to learn. Detection/segmentation answers hold
    # <loc>/<seg> tokens, which are appended as whole pieces below: left in the text, they would
    # waste the learned vocabulary on fragments such as "loc" and "><".
    texts = (_LOC_SEG.sub(" ", text) for text in texts)
    lines = [line for text in texts for line in text.split("\n") if line.strip()]
    if not lines:
        raise PaliGemmaError("cannot train a tokenizer on empty text: give it at least one non-empty line")
    model = run_sentencepiece_trainer(
        lines,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # a tiny corpus yields fewer pieces instead of failing
        character_coverage=1.0,  # every character seen gets a piece; others fall back to bytes
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        # User-defined pieces are matched before BPE, so "\n" is always one token (108 in Gemma).
        user_defined_symbols=["<mask>", "\n"],
        num_threads=1,  # determinism
        shuffle_input_sentence=False,
    )
    data = _append_user_defined(model, LOC_TOKENS + SEG_TOKENS)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(data)
    return out_path


def _append_user_defined(model_bytes: bytes, pieces: list[str]) -> bytes:
    """Append `pieces` as USER_DEFINED entries (score 0) to a serialized SentencePiece ModelProto.

    A protobuf parser appends every repeated-field entry it meets, wherever it is in the stream, so
    new `pieces` entries (ModelProto field 1) can simply be written after the message. This spares
    a runtime dependency on the `protobuf` package. Entry layout (sentencepiece_model.proto):
    `SentencePiece { string piece = 1; float score = 2; Type type = 3; }`, USER_DEFINED = 4.
    """
    out = bytearray(model_bytes)
    for piece in pieces:
        name = piece.encode()
        entry = b"\x0a" + _varint(len(name)) + name  # field 1, length-delimited: piece
        entry += b"\x15" + struct.pack("<f", 0.0)  # field 2, 32-bit: score
        entry += b"\x18\x04"  # field 3, varint: type = USER_DEFINED
        out += b"\x0a" + _varint(len(entry)) + entry  # ModelProto field 1: pieces
    return bytes(out)


def _varint(n: int) -> bytes:
    """Protobuf base-128 varint: 7 bits a byte, low bits first, high bit set on all but the last."""
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


def run_sentencepiece_trainer(lines: list[str], **options) -> bytes:
    """Train a SentencePiece model on `lines` in memory, quietly; return the serialized model.

    The trainer writes pages of progress to stderr and, to silence it, needs `sys.stderr` to have a
    file descriptor; Jupyter and test runners replace it with streams that have none, so the real one
    is lent for the call.
    """
    saved = sys.stderr
    try:
        sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        sys.stderr = sys.__stderr__
    model = io.BytesIO()
    try:
        with open(os.devnull, "w") as quiet:
            spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, logstream=quiet,
                                           **options)
    except RuntimeError as e:
        raise PaliGemmaError(f"tokenizer training failed: {e}") from None
    finally:
        sys.stderr = saved
    return model.getvalue()


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
    model = run_sentencepiece_trainer(
        lines, model_type="bpe", vocab_size=vocab_size, hard_vocab_limit=False, character_coverage=1.0,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        num_threads=1, shuffle_input_sentence=False,  # determinism
    )
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(model)
    return out_path
