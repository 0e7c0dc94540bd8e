"""PaliGemmaTokenizer, StreamDecoder and train_tokenizer, checked against transformers' GemmaTokenizer."""

import io
import re
from pathlib import Path

import pytest
import yaml

from paligemma_cli.errors import PaliGemmaError
from paligemma_cli.processing.tokenizer import PaliGemmaTokenizer
from paligemma_cli.training.tokenizer_training import train_tokenizer
from tests.fixtures.tokenizer import CORPUS, make_tiny_tokenizer

TEXTS = [
    "caption en\n",
    "answer en what is on the table?\n",
    "detect cat ; dog\n",
    "<loc0012><loc0100><loc0500><loc1023> cat ; <loc0000><loc0001><loc0002><loc0003> dog",
    "<loc0001><seg000><seg127> x",
    " leading and  double   spaces ",
    "a\n\nb\n",
    "café 日本 🙂 naïve",
    "There are 1234 apples.",
    "",
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    make_tiny_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def tok(folder):
    return PaliGemmaTokenizer.from_folder(folder)


@pytest.fixture(scope="module")
def hf_tok(folder):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(folder, tokenizer_type="gemma")
    hf.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return hf


def test_gemma_layout(tok):
    n = tok.sp.get_piece_size()
    assert [tok.sp.id_to_piece(i) for i in range(6)] == ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "\n"]
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
    assert tok.newline_id == 5 and tok.encode("\n") == [5]
    assert tok.loc_token(0) == n - 1152 and tok.loc_token(1023) == n - 129
    assert tok.seg_token(0) == n - 128 and tok.seg_token(127) == n - 1
    assert tok.image_token_id == n and tok.vocab_size == n + 1
    assert tok.encode("<loc0007>") == [tok.loc_token(7)]
    with pytest.raises(ValueError):
        tok.loc_token(1024)


def test_ids_match_transformers(tok, hf_tok):
    assert hf_tok.convert_tokens_to_ids("<image>") == tok.image_token_id
    for text in TEXTS:
        assert tok.encode(text) == hf_tok(text, add_special_tokens=False).input_ids, repr(text)


def test_decode_matches_transformers(tok, hf_tok):
    special = [tok.bos_id, tok.eos_id, tok.pad_id]
    for text in TEXTS:
        ids = [tok.bos_id] + tok.encode(text) + [tok.eos_id, tok.pad_id]
        assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True) == text
        assert tok.decode(ids, skip_special=False) == hf_tok.decode(ids, skip_special_tokens=False)
    assert tok.decode(special) == ""


def test_decode_drops_image_and_out_of_vocab_ids(tok):
    ids = [tok.image_token_id] * 3 + [tok.bos_id] + tok.encode("hi") + [tok.vocab_size + 40]
    assert tok.decode(ids) == "hi"
    assert tok.decode(ids, skip_special=False) == "<image>" * 3 + "<bos>hi"
    torch = pytest.importorskip("torch")
    assert tok.decode(torch.tensor(ids)) == "hi"


def stream(tok, ids, **kw):
    decoder = tok.stream(**kw)
    chunks = [decoder.push(i) for i in ids]
    return chunks, decoder.flush()


@pytest.mark.parametrize("text", TEXTS + [" 🙂🙂 日本語 ", "\n café\n", "<loc0001> café <seg005>"])
def test_stream_decoder_equals_decode(tok, text):
    ids = [tok.image_token_id, tok.bos_id] + tok.encode(text) + [tok.eos_id]
    chunks, rest = stream(tok, ids)
    assert "".join(chunks) + rest == tok.decode(ids) == text
    assert rest == "" and not any("\ufffd" in c for c in chunks)
    chunks, rest = stream(tok, ids, skip_special=False)
    assert "".join(chunks) + rest == tok.decode(ids, skip_special=False)


def test_stream_decoder_waits_for_whole_characters(tok):
    ids = tok.encode("a 日")  # 'a', '▁', then 日 as three byte pieces
    assert [tok.sp.id_to_piece(i) for i in ids[-3:]] == ["<0xE6>", "<0x97>", "<0xA5>"]
    chunks, _ = stream(tok, ids)
    assert chunks == ["a", " ", "", "", "日"]


def test_stream_decoder_flushes_incomplete_character(tok):
    ids = tok.encode("ok 日")[:-1]  # last byte missing
    chunks, rest = stream(tok, ids)
    assert "".join(chunks) == "ok " and rest.endswith("\ufffd")
    assert "".join(chunks) + rest == tok.decode(ids)


def test_stream_decoder_with_dummy_prefix_tokenizer(tmp_path):
    """A tokenizer that, unlike Gemma's, strips the leading space of the first piece on decode."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS.splitlines()), model_writer=model,
                                   vocab_size=300, byte_fallback=True, model_type="bpe",
                                   hard_vocab_limit=False, num_threads=1, minloglevel=2)
    tok = PaliGemmaTokenizer(spm.SentencePieceProcessor(model_proto=model.getvalue()))
    for text in ["a cat sits", "café 日本 🙂 ok", "日本 ok"]:
        ids = [tok.bos_id] + tok.encode(text)
        ids[3:3] = [tok.pad_id, tok.image_token_id]  # skipped ids mid-stream must not reset spacing
        assert tok.sp.id_to_piece(ids[1]).startswith("▁")  # the dummy prefix
        chunks, rest = stream(tok, ids)
        assert not "".join(chunks).startswith(" ")
        assert "".join(chunks) + rest == tok.decode(ids) == text


def test_training_is_deterministic(tmp_path, folder):
    again = make_tiny_tokenizer(tmp_path)
    assert again.read_bytes() == (folder / "tokenizer.model").read_bytes()


def test_training_rejects_empty_text(tmp_path):
    with pytest.raises(PaliGemmaError, match="empty"):
        train_tokenizer(["", "\n \n"], tmp_path / "tokenizer.model")


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(PaliGemmaError, match="no tokenizer.model in") as e:
        PaliGemmaTokenizer.from_folder(tmp_path)
    assert "\n" not in str(e.value)
    with pytest.raises(PaliGemmaError, match="not found"):
        PaliGemmaTokenizer.from_file(tmp_path / "nope.model")
    (tmp_path / "tokenizer.model").write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(PaliGemmaError, match="not a SentencePiece model") as e:
        PaliGemmaTokenizer.from_folder(tmp_path)
    assert "\n" not in str(e.value)


def test_appended_pieces_parse_as_protobuf_writes_them():
    """The hand-written protobuf entries equal what the protobuf package itself would add."""
    pb = pytest.importorskip("sentencepiece.sentencepiece_model_pb2")
    from paligemma_cli.training.tokenizer_training import _append_user_defined

    base = pb.ModelProto()
    base.pieces.add(piece="<pad>", score=0.0, type=pb.ModelProto.SentencePiece.CONTROL)
    base.trainer_spec.vocab_size = 1  # a field after `pieces`: the new entries must still append
    pieces = ["<loc0000>", "<seg127>", "é" * 100]  # the last one needs a two-byte length
    ours = pb.ModelProto()
    ours.ParseFromString(_append_user_defined(base.SerializeToString(), pieces))
    for piece in pieces:
        base.pieces.add(piece=piece, score=0.0, type=pb.ModelProto.SentencePiece.USER_DEFINED)
    assert ours == base


def test_training_on_detection_answers(tmp_path):
    """<loc>/<seg> in the training text are whole pieces already: no vocabulary spent on their parts."""
    answers = ["<loc0001><loc0002><loc0003><loc0004> cat ; <loc0001><loc0002><loc0003><loc0004> dog"] * 200
    tok = PaliGemmaTokenizer.from_file(train_tokenizer(answers + [CORPUS], tmp_path / "t.model", vocab_size=400))
    learned = [tok.sp.id_to_piece(i) for i in range(tok.loc_token(0))]
    assert "loc" not in learned and "><" not in learned
    assert tok.encode(answers[0])[:4] == [tok.loc_token(i) for i in (1, 2, 3, 4)]


def shapes_texts(n: int = 400) -> list[str]:
    """Every prefix and suffix of n shapes-world scenes: the text a demo-model tokenizer is trained on."""
    from paligemma_cli.data.shapes import make_scene, scene_examples

    return [f"{e['prefix']}\n{e['suffix']}" for i in range(n) for e in scene_examples(make_scene(0, i))]


def test_demo_config_tokenizer_learns_whole_words(tmp_path):
    """At the demo config's vocabulary size, every shapes-world word is one piece.

    The demo model once used 320 pieces, of which 256 are byte fallbacks: "shapes" became six letters,
    questions 22 tokens instead of 9, and a 4-layer decoder spent its depth spelling."""
    config = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
    vocab = yaml.safe_load(config.read_text())["tokenizer_vocab_size"]
    texts = shapes_texts()
    tok = PaliGemmaTokenizer.from_file(train_tokenizer(texts, tmp_path / "t.model", vocab_size=vocab))
    words = {w for t in texts for w in re.findall(r"[a-z]+", re.sub(r"<(loc|seg)\d+>", " ", t))}
    assert {"yellow", "triangle", "shapes", "left", "caption", "detect"} <= words
    for text in texts:
        pieces = [tok.sp.id_to_piece(i) for i in tok.encode(text)]
        assert all(p.lstrip("▁") in words for p in pieces if re.search("[a-z]", p) and not p.startswith("<")), pieces
    assert len(tok.encode("answer en how many shapes are there?\n")) == 9  # 7 words, "?", "\n"
