"""The SigLIP tokenizer trainer on a small, repetitive corpus: every word kept, none lost to <unk>."""

import sentencepiece as spm

from paligemma_cli.data.shapes import caption, make_scene
from paligemma_cli.processing.siglip_tokenizer import canonicalize
from paligemma_cli.training.tokenizer_training import train_siglip_tokenizer


def test_shapes_captions_tokenize_into_whole_words(tmp_path):
    """SentencePiece's unigram trainer once stopped at 30 pieces on these captions: "yellow" became
    letters and "h" an <unk>, so the text tower could not read what it was matched against."""
    captions = [caption(make_scene(0, i)) for i in range(400)]
    sp = spm.SentencePieceProcessor(model_file=str(train_siglip_tokenizer(captions, tmp_path / "t.model")))
    words = {w for c in captions for w in canonicalize(c).split()}
    assert {"yellow", "triangle", "orange", "and"} <= words
    for text in captions:
        ids = sp.encode(canonicalize(text))
        assert sp.unk_id() not in ids, text
    for word in words:
        assert sp.encode(word, out_type=str) == ["▁" + word], word
