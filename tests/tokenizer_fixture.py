"""A tiny Gemma-layout SentencePiece tokenizer for tests (trains in well under a second).

Import `make_tiny_tokenizer` from other tests. Layout (see `core/tokenizer_training.py`):
0 <pad>, 1 <eos>, 2 <bos>, 3 <unk>, 4 <mask>, 5 "\\n", then bytes and ~140 learned pieces,
then 1024 <loc> and 128 <seg> pieces; `<image>` is the id after the last piece.
"""

from __future__ import annotations

from pathlib import Path

from paligemma_cli.training.tokenizer_training import train_tokenizer

TINY_VOCAB = 400  # learned pieces incl. specials and 256 bytes; <loc>/<seg> come on top

CORPUS = """\
caption en
describe en
answer en what is on the table?
answer en how many dogs are there?
question en a red bus
detect cat ; dog
segment person ; car
ocr
A cat sits on a red bench in the park.
Two dogs play with a ball near the river.
The quick brown fox jumps over the lazy dog.
A man rides a bicycle down a busy street at night.
There are 3 apples and 12 oranges in the bowl.
A woman reads a book in a small café.
Children are playing football on a sunny afternoon.
An old car is parked in front of a house with a blue door.
The sign says open from 9 to 5.
A naïve bird stands on the roof of the station.
"""


def make_tiny_tokenizer(folder: str | Path) -> Path:
    """Train the tiny tokenizer into `<folder>/tokenizer.model` and return that file's path.

    Deterministic; writes nothing outside `folder`. Load it with
    `PaliGemmaTokenizer.from_folder(folder)` or, as the reference,
    `AutoTokenizer.from_pretrained(folder, tokenizer_type="gemma")`.
    """
    return train_tokenizer([CORPUS], Path(folder) / "tokenizer.model", vocab_size=TINY_VOCAB)
