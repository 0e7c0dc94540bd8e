"""PaliGemma's tokenizer: the checkpoint's SentencePiece `tokenizer.model` plus the `<image>` id.

References: google/sentencepiece (`SentencePieceProcessor`); transformers' `GemmaTokenizer` and
`PaliGemmaProcessor`, which add `<image>`
as one extra token after the last piece (257152 for real checkpoints) and tokenize `<loc>`/`<seg>`
pieces as single tokens.

Ids are plain Python ints. The processor builds tensors from them.
"""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm

from paligemma_cli.errors import PaliGemmaError

TOKENIZER_FILE = "tokenizer.model"


def load_sentencepiece(path: str | Path):
    """A `sentencepiece.SentencePieceProcessor` from a model file; a missing or unreadable file is a
    one-line PaliGemmaError."""
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
    except (RuntimeError, OSError, TypeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PaliGemmaError(
            f"cannot read tokenizer file '{path}': not a SentencePiece model ({reason}); "
            "copy the checkpoint's tokenizer.model again"
        ) from None
    return sp


class PaliGemmaTokenizer:
    """A SentencePiece model with Gemma's special ids and PaliGemma's `<image>` token.

    Real checkpoints: pad 0, eos 1, bos 2, unk 3, "\\n" 108, `<loc0000>` 256000, `<seg000>` 257024,
    `<image>` 257152. Every id is read from the model file, so tiny test tokenizers work the same way.
    """

    def __init__(self, sp):
        """Wrap a loaded `sentencepiece.SentencePieceProcessor`; use `from_file`/`from_folder`."""
        self.sp = sp
        self._num_pieces = sp.get_piece_size()

    @classmethod
    def from_file(cls, path: str | Path) -> PaliGemmaTokenizer:
        """Load a SentencePiece `tokenizer.model`; a missing or unreadable file is a PaliGemmaError."""
        return cls(load_sentencepiece(path))

    @classmethod
    def from_folder(cls, folder: str | Path) -> PaliGemmaTokenizer:
        """Load `<folder>/tokenizer.model` (the file every PaliGemma checkpoint folder ships)."""
        path = Path(folder) / TOKENIZER_FILE
        if not path.is_file():
            raise PaliGemmaError(
                f"no {TOKENIZER_FILE} in '{folder}': a PaliGemma checkpoint folder must hold one "
                "(download the checkpoint again, or train one for a model trained from scratch)"
            )
        return cls.from_file(path)

    # --- special ids -------------------------------------------------------------------------

    @property
    def pad_id(self) -> int:
        return self.sp.pad_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def image_token_id(self) -> int:
        """`<image>` is not in the SentencePiece model; transformers appends it after the last piece."""
        return self._num_pieces

    @property
    def newline_id(self) -> int:
        """The id of "\\n" (108 in Gemma), which ends every prompt."""
        ids = self.encode("\n")
        if len(ids) != 1:
            raise PaliGemmaError('this tokenizer has no single piece for "\\n"; it is not a Gemma tokenizer')
        return ids[0]

    @property
    def vocab_size(self) -> int:
        """Number of ids this tokenizer can produce: every piece plus `<image>` (257153 for real ones).

        The model's embedding may have more rows (257216, padded to a multiple of 64).
        """
        return self._num_pieces + 1

    def loc_token(self, i: int) -> int:
        """Id of `<locNNNN>`, the i-th of the 1024 location bins (0..1023)."""
        return self._piece_id(f"<loc{i:04d}>", i, 1024)

    def seg_token(self, i: int) -> int:
        """Id of `<segNNN>`, the i-th of the 128 segmentation codes (0..127)."""
        return self._piece_id(f"<seg{i:03d}>", i, 128)

    def _piece_id(self, piece: str, i: int, n: int) -> int:
        if not 0 <= i < n:
            raise ValueError(f"{piece} is out of range: expected 0..{n - 1}")
        idx = self.sp.piece_to_id(piece)
        if idx == self.sp.unk_id():
            raise PaliGemmaError(f"this tokenizer has no {piece} piece; it is not a PaliGemma tokenizer")
        return idx

    # --- text <-> ids ------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without bos/eos. `<locNNNN>`/`<segNNN>` in the text become one id each."""
        return self.sp.encode(text)

    def is_text(self, i: int) -> bool:
        """True for ids that decode to text; False for pad/eos/bos, `<image>` and ids past the vocab.

        Ids past the vocab exist because the embedding is padded (257216 rows); a model can emit them.
        """
        return 0 <= i < self._num_pieces and not self.sp.is_control(i)

    def decode(self, ids, skip_special: bool = True) -> str:
        """Text of `ids` (a list or 1-D tensor).

        `<loc>`/`<seg>` pieces stay in the text (detection and segmentation parse them). With
        `skip_special`, pad/bos/eos/`<image>` are dropped; otherwise they appear as `<bos>` etc.
        Ids past the vocab are always dropped.
        """
        ids = [int(i) for i in ids]
        if skip_special:
            return self.sp.decode([i for i in ids if self.is_text(i)])
        parts, run = [], []
        for i in ids:
            if self.is_text(i):
                run.append(i)
                continue
            if run:
                parts.append(self.sp.decode(run))
                run = []
            if i == self.image_token_id:
                parts.append("<image>")
            elif 0 <= i < self._num_pieces:
                parts.append(self.sp.id_to_piece(i))
        parts.append(self.sp.decode(run))
        return "".join(parts)

    def stream(self, skip_special: bool = True) -> StreamDecoder:
        """A fresh incremental decoder; see `StreamDecoder`."""
        return StreamDecoder(self, skip_special)


class StreamDecoder:
    """Turns token ids, pushed one at a time, into the new text to print.

    `"".join(push(i) for i in ids) + flush() == tokenizer.decode(ids)`. Two things make the naive
    "decode each token" wrong: SentencePiece decides spacing from context, and a character outside
    the vocabulary arrives as 2-4 byte pieces (`<0xE6><0x97><0xA5>`) that mean nothing alone.
    So (as text-generation-inference does) we decode a short window twice, with and without the new
    ids, print the difference, and hold it back while it ends in an incomplete character (U+FFFD).
    """

    def __init__(self, tokenizer: PaliGemmaTokenizer, skip_special: bool = True):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start: context for spacing
        self.read_offset = 0  # everything before this has been printed

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes ("" while a character is still incomplete)."""
        token_id = int(token_id)
        # Skipped ids add no text; leaving them out also keeps every window starting on a real piece.
        if self.skip_special and not self.tokenizer.is_text(token_id):
            return ""
        self.ids.append(token_id)
        text = self._new_text()
        if not text or text.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text

    def flush(self) -> str:
        """Return what is still held back (an incomplete character decodes to U+FFFD, as in decode)."""
        text = self._new_text()
        self.prefix_offset = self.read_offset = len(self.ids)
        return text

    def _new_text(self) -> str:
        decode = self.tokenizer.decode
        printed = decode(self.ids[self.prefix_offset : self.read_offset], self.skip_special)
        full = decode(self.ids[self.prefix_offset :], self.skip_special)
        return full[len(printed) :]
