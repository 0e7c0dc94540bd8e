"""Checks on text from the user (a question, a prompt, labels) before it reaches the tokenizer."""

from __future__ import annotations

from paligemma_cli.errors import PaliGemmaError


def check_text(text: str, what: str = "the text") -> str:
    """`text` unchanged, or a one-line error if it is not valid UTF-8.

    Python hands over command-line arguments and piped lines that are not valid UTF-8 as strings with
    lone surrogates (`surrogateescape`); SentencePiece cannot encode those.
    """
    bad = next((i for i, c in enumerate(text) if "\ud800" <= c <= "\udfff"), None)
    if bad is not None:
        raise PaliGemmaError(f"{what} is not valid UTF-8 (at character {bad + 1}); check the terminal's or "
                             "the file's encoding")
    return text
