"""PaliGemmaProcessor against transformers' PaliGemmaProcessor on the same tiny tokenizer and images."""

import pytest
import torch
from PIL import Image

from paligemma_cli.errors import PaliGemmaError
from paligemma_cli.processing.processor import IGNORE_INDEX, PaliGemmaProcessor
from paligemma_cli.processing.tokenizer import PaliGemmaTokenizer
from tests.fixtures.tokenizer import make_tiny_tokenizer
from tests.processing.test_image import random_image

# transformers 5.24 itself trips a numpy 2 DeprecationWarning when it builds labels.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SIZE, N_IMG = 28, 16
PROMPTS = ["caption en", "answer en how many dogs are there?", "detect cat ; dog", "ocr"]
SUFFIXES = [
    "A cat sits on a red bench.",
    "3",
    "<loc0012><loc0100><loc0500><loc1023> cat ; <loc0000><loc0001><loc0002><loc0003> dog",
    "café 日本 🙂",
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    make_tiny_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def proc(folder):
    return PaliGemmaProcessor(PaliGemmaTokenizer.from_folder(folder), SIZE, N_IMG)


def hf_processor(folder, padding_side: str | None = None):
    """transformers' processor built as the spec says (fresh each time: it mutates its tokenizer)."""
    transformers = pytest.importorskip("transformers")
    from tests.processing.test_image import hf_image_processor

    tok = transformers.AutoTokenizer.from_pretrained(folder, tokenizer_type="gemma")
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    if padding_side is not None:
        tok.padding_side = padding_side
    image_processor = hf_image_processor(SIZE)
    image_processor.image_seq_length = N_IMG
    return transformers.PaliGemmaProcessor(image_processor=image_processor, tokenizer=tok)


def images(n):
    return [random_image(20 + 7 * i, 40 - 5 * i, "RGB", seed=i) for i in range(n)]


def assert_same(ours: dict, theirs, keys):
    for key in keys:
        assert ours[key].dtype == theirs[key].dtype, key
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0, msg=key)


def test_generation_batch_matches_transformers(folder, proc):
    ims = images(len(PROMPTS))
    ours = proc(PROMPTS, ims)
    theirs = hf_processor(folder)(images=ims, text=["<image>" + p for p in PROMPTS], return_tensors="pt",
                                  padding="longest")
    assert_same(ours, theirs, ["input_ids", "attention_mask", "token_type_ids", "pixel_values"])
    assert "labels" not in ours and (theirs["labels"] == IGNORE_INDEX).all()
    assert (ours["attention_mask"][:, -1] == 1).all()  # left padded: every row ends at the last column


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_training_batch_matches_transformers(folder, proc, padding_side):
    ims = images(len(PROMPTS))
    ours = proc(PROMPTS, ims, suffixes=SUFFIXES, padding_side=padding_side)
    theirs = hf_processor(folder, padding_side)(images=ims, text=["<image>" + p for p in PROMPTS],
                                                suffix=SUFFIXES, return_tensors="pt", padding="longest")
    assert_same(ours, theirs, ["input_ids", "attention_mask", "token_type_ids", "labels", "pixel_values"])


def test_default_padding_sides(proc):
    prompts = ["ocr", "answer en how many dogs are there?"]
    gen = proc(prompts)
    assert gen["attention_mask"][0, 0] == 0 and gen["attention_mask"][0, -1] == 1
    train = proc(prompts, suffixes=["a b c d e f g h i j k l m n o p q", "x"])
    assert train["attention_mask"][1, 0] == 1 and train["attention_mask"][1, -1] == 0


def test_example_layout(proc):
    tok = proc.tokenizer
    batch = proc("caption en", Image.new("RGB", (5, 5)), suffixes="a cat")
    ids, types, labels = batch["input_ids"][0], batch["token_type_ids"][0], batch["labels"][0]
    prefix, suffix = tok.encode("caption en"), tok.encode("a cat")
    expected = [tok.image_token_id] * N_IMG + [tok.bos_id] + prefix + [tok.newline_id] + suffix + [tok.eos_id]
    assert ids.tolist() == expected
    n_prompt = N_IMG + 1 + len(prefix) + 1
    assert types.tolist() == [0] * n_prompt + [1] * (len(suffix) + 1)
    assert labels.tolist() == [IGNORE_INDEX] * n_prompt + suffix + [tok.eos_id]
    assert batch["pixel_values"].shape == (1, 3, SIZE, SIZE)
    assert tok.decode(ids) == "caption en\na cat"


def test_images_as_paths(proc, tmp_path):
    path = tmp_path / "x.png"
    im = images(1)[0]
    im.save(path)
    torch.testing.assert_close(proc("ocr", [path])["pixel_values"], proc("ocr", [im])["pixel_values"])


def test_max_length(proc):
    n = len(proc.prompt_ids("caption en"))
    assert proc("caption en", max_length=n)["input_ids"].shape == (1, n)
    with pytest.raises(PaliGemmaError, match=f"^prompt is {n} tokens; this model allows at most {n - 1}$"):
        proc(["ocr", "caption en"], max_length=n - 1)
    with pytest.raises(PaliGemmaError, match=f"prompt with its suffix is {n + 2} tokens"):
        proc("caption en", suffixes="a", max_length=n + 1)


def test_count_mismatch(proc):
    with pytest.raises(PaliGemmaError, match="2 prompts but 1 images"):
        proc(["ocr", "ocr"], images(1))
    with pytest.raises(PaliGemmaError, match="2 prompts but 1 suffixes"):
        proc(["ocr", "ocr"], suffixes=["x"])


@pytest.mark.parametrize("counts", [(2, 2), (3, 3), (2, 3, 1)])
def test_several_images_per_prompt_match_transformers(folder, proc, counts):
    prompts = PROMPTS[: len(counts)]
    per_prompt, start, pool = [], 0, images(sum(counts))
    for k in counts:
        per_prompt.append(pool[start:start + k])
        start += k
    ours = proc(prompts, per_prompt, suffixes=SUFFIXES[: len(counts)], padding_side="left")
    theirs = hf_processor(folder, "left")(images=per_prompt, text=prompts, suffix=SUFFIXES[: len(counts)],
                                          return_tensors="pt", padding="longest")
    assert_same(ours, theirs, ["input_ids", "attention_mask", "token_type_ids", "labels", "pixel_values"])
    assert ours["pixel_values"].shape == (sum(counts), 3, SIZE, SIZE)
    image_id = proc.tokenizer.image_token_id
    assert [(row == image_id).sum().item() for row in ours["input_ids"]] == [N_IMG * k for k in counts]


def test_multi_image_layout_and_errors(proc):
    tok = proc.tokenizer
    pair = images(2)
    ids = proc("answer en is it the same?", [pair])["input_ids"][0].tolist()
    assert ids[: 2 * N_IMG + 1] == [tok.image_token_id] * (2 * N_IMG) + [tok.bos_id]
    assert proc("ocr", [tuple(pair)])["pixel_values"].shape[0] == 2
    with pytest.raises(PaliGemmaError, match="empty list of images"):
        proc("ocr", [[]])
    with pytest.raises(PaliGemmaError, match="2 prompts but 1 images"):
        proc(["ocr", "ocr"], [pair])
