"""The server as real clients use it: the official `openai` client and `llm`, against uvicorn on 127.0.0.1.

Answers are compared with `paligemma ask` run on the same image, prompt and settings (greedy, fp32).
"""

from __future__ import annotations

import concurrent.futures
import math

import httpx
import numpy as np
import pytest
import torch
from openai import OpenAI
from PIL import Image
from typer.testing import CliRunner

from paligemma_cli.checkpoints.hf import save_dual_encoder
from paligemma_cli.cli import app as cli_app
from paligemma_cli.inference.batching import BatchEngine
from paligemma_cli.inference.embeddings import embed_images, embed_texts
from paligemma_cli.inference.pipeline import Pipeline
from paligemma_cli.model.config import SiglipConfig
from paligemma_cli.model.siglip import DualEncoder
from paligemma_cli.processing.image import load_image, preprocess
from paligemma_cli.processing.siglip_tokenizer import SiglipTokenizer
from paligemma_cli.server.app import create_app
from paligemma_cli.server.config import ServerConfig
from paligemma_cli.settings import DEMO_MODEL
from paligemma_cli.training.tokenizer_training import train_siglip_tokenizer
from tests.fixtures.server import ServerThread, data_url, user_message

KEY = "test-key"
SHAPES = "examples/shapes.png"
QUESTIONS = ["what color is the circle?", "caption en", "detect circle", "how many shapes?", "describe en",
             "what is on the left?", "detect square ; triangle", "answer en what color is the square?"]


@pytest.fixture(scope="module")
def server():
    pipe = Pipeline.load(DEMO_MODEL, "cpu", "fp32", fast_layout=True)
    engine = BatchEngine(pipe, max_batch=8, max_new_tokens=64)
    cfg = ServerConfig(model_name="paligemma-demo", api_key=KEY, max_tokens=64)
    with ServerThread(create_app(cfg, engine)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def images():
    shapes = load_image(SHAPES)
    return [shapes, shapes.rotate(90), shapes.transpose(Image.Transpose.FLIP_LEFT_RIGHT), shapes,
            shapes.rotate(180), shapes, shapes.rotate(270), shapes]


def ask(tmp_path, image: Image.Image, question: str, max_tokens: int = 64) -> str:
    """`paligemma ask` itself: a raw prefix goes in --prompt, a question as QUESTION (it adds `answer en`)."""
    path = tmp_path / f"img{abs(hash(image.tobytes())) % 10**8}.png"
    image.save(path)
    raw = question.split(" ", 1)[0] in ("caption", "detect", "describe", "answer")
    args = ["ask", str(path), *(["--prompt", question] if raw else [question]), "--max-tokens", str(max_tokens),
            "--dtype", "fp32", "--device", "cpu"]
    result = CliRunner().invoke(cli_app, args)
    assert result.exit_code == 0, result.output
    return result.stdout.removesuffix("\n")


def complete(client, question, image, **kw):
    return client.chat.completions.create(model="paligemma-demo", messages=user_message(question, data_url(image)),
                                          **kw)


def test_plain_and_streamed_answers_equal_paligemma_ask(client, images, tmp_path):
    expected = ask(tmp_path, images[0], QUESTIONS[0])
    reply = complete(client, QUESTIONS[0], images[0])
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason == "stop" and reply.model == "paligemma-demo"
    assert reply.usage.completion_tokens >= 1
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.usage.prompt_tokens > 64  # the image block is part of the prompt
    stream = complete(client, QUESTIONS[0], images[0], stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_eight_concurrent_mixed_requests_equal_paligemma_ask_one_by_one(client, images, tmp_path):
    expected = [ask(tmp_path, im, q) for im, q in zip(images, QUESTIONS)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(complete, client, q, im, stream=i % 2 == 1)
                   for i, (im, q) in enumerate(zip(images, QUESTIONS))]
        replies = [f.result() for f in futures]
    got = [r.choices[0].message.content if i % 2 == 0
           else "".join(c.choices[0].delta.content or "" for c in r if c.choices) for i, r in enumerate(replies)]
    assert got == expected


def test_detect_replies_carry_the_parsed_boxes(client, images):
    reply = complete(client, "detect circle", images[0])
    message = reply.choices[0].message
    assert message.content.startswith("<loc") and message.content.endswith("circle")
    (found,) = message.model_extra["detections"]
    assert found["label"] == "circle"
    x0, y0, x1, y1 = found["box"]
    assert 0 <= x0 < x1 <= images[0].width and 0 <= y0 < y1 <= images[0].height
    assert "detections" not in complete(client, "caption en", images[0]).choices[0].message.model_extra


def test_two_images_in_one_message_make_one_prompt_with_both_blocks(client, images):
    reply = client.chat.completions.create(model="paligemma-demo", messages=user_message(
        "caption en", data_url(images[0]), data_url(images[1])))
    one = complete(client, "caption en", images[0])
    assert reply.usage.prompt_tokens == one.usage.prompt_tokens + 64  # a second block of 64 image tokens
    assert reply.choices[0].message.content


def test_sampling_settings_seed_stop_and_max_tokens(client, images):
    kw = dict(temperature=1.5, top_p=0.95, seed=11, max_tokens=20)
    a = complete(client, "caption en", images[0], **kw).choices[0].message.content
    b = complete(client, "caption en", images[0], **kw).choices[0].message.content
    assert a == b  # the same seed gives the same sample
    greedy = complete(client, "caption en", images[0]).choices[0].message.content
    cut = complete(client, "caption en", images[0], stop=[greedy[5:9]]).choices[0]
    assert cut.message.content == greedy[:greedy.index(greedy[5:9])] and cut.finish_reason == "stop"
    short = complete(client, "caption en", images[0], max_completion_tokens=2).choices[0]
    assert short.finish_reason == "length"
    assert greedy.startswith(short.message.content) and len(short.message.content) < len(greedy)


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list()] == ["paligemma-demo"]
    assert client.models.retrieve("paligemma-demo").id == "paligemma-demo"


def test_llm_with_an_openai_compatible_model_entry(server, tmp_path, monkeypatch, tmp_path_factory):
    llm = pytest.importorskip("llm")
    monkeypatch.setenv("LLM_USER_PATH", str(tmp_path))
    (tmp_path / "extra-openai-models.yaml").write_text(
        f"- model_id: paligemma-local\n  model_name: paligemma-demo\n  api_base: {server.url}/v1\n"
        "  api_key_name: paligemma\n  vision: true\n")
    model = llm.get_model("paligemma-local")
    response = model.prompt("what color is the circle?", attachments=[llm.Attachment(path=SHAPES)], key=KEY)
    assert response.text() == ask(tmp_path_factory.mktemp("llm"), load_image(SHAPES), "what color is the circle?")


# --- embeddings -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("siglip") / "model"
    texts = ["a red circle", "a blue square", "an orange triangle", "a green circle"]
    tok_file = train_siglip_tokenizer(texts, folder.parent / "tokenizer.model")
    torch.manual_seed(0)
    model = DualEncoder(SiglipConfig.from_name("siglip-tiny-32", text__vocab_size=SiglipTokenizer.from_file(
        tok_file).vocab_size)).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(4.0))
    save_dual_encoder(model, folder)
    tokenizer = SiglipTokenizer.from_file(tok_file, model.config.text.max_position_embeddings)
    return model, tokenizer


def test_embeddings_for_texts_and_images_are_the_models_normalised(siglip):
    model, tokenizer = siglip
    cfg = ServerConfig(model_name=None, embedding_model_name="siglip-test")
    image = load_image(SHAPES)
    with ServerThread(create_app(cfg, None, model, tokenizer)) as s:
        client = OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        url = data_url(image)
        reply = client.embeddings.create(model="siglip-test", input=["a red circle", url, "a blue square"])
        floats = client.embeddings.create(model="siglip-test", input="a red circle", encoding_format="float")
        no_chat = httpx.post(s.url + "/v1/chat/completions", json={"model": "x", "messages": user_message("hi", url)})
    vectors = np.array([d.embedding for d in reply.data])
    txt = torch.nn.functional.normalize(embed_texts(model, tokenizer, ["a red circle", "a blue square"]), dim=-1)
    img = torch.nn.functional.normalize(embed_images(model, preprocess([image], 32)), dim=-1)
    np.testing.assert_allclose(vectors, torch.stack([txt[0], img[0], txt[1]]).numpy(), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert [d.index for d in reply.data] == [0, 1, 2]
    assert reply.usage.prompt_tokens == len(tokenizer.encode("a red circle")) + len(tokenizer.encode("a blue square"))
    np.testing.assert_allclose(floats.data[0].embedding, vectors[0], atol=1e-6)
    assert no_chat.status_code == 404 and no_chat.json()["error"]["code"] == "model_not_found"
