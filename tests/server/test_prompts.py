"""How chat messages become a PaliGemma prompt (the rules docs/serve.md states), and malformed messages."""

from __future__ import annotations

import pytest

from paligemma_cli.server.errors import ApiError
from paligemma_cli.server.prompts import messages_to_prompt, text_to_prompt

IMG = "data:image/png;base64,AAAA"


@pytest.mark.parametrize("text, prompt", [
    ("caption en", "caption en"),
    ("detect cat ; dog", "detect cat ; dog"),
    ("segment person", "segment person"),
    ("ocr", "ocr"),
    ("answer de wie viele?", "answer de wie viele?"),
    ("question en a red bus", "question en a red bus"),
    ("describe en", "describe en"),
    ("what color is the circle?", "answer en what color is the circle?"),
    ("Caption this", "answer en Caption this"),  # task words are lowercase, as PaliGemma was trained
    ("detection of cats", "answer en detection of cats"),  # the whole first word must be a task word
    ("  what\n is   it? ", "answer en what is it?"),  # whitespace collapses: the prefix ends at its newline
    ("", "caption en"),
    ("   ", "caption en"),
])
def test_task_words_go_raw_and_anything_else_is_a_question(text, prompt):
    assert text_to_prompt(text, "en") == prompt


def test_the_language_code_goes_into_questions_and_default_captions():
    assert text_to_prompt("wie viele Katzen?", "de") == "answer de wie viele Katzen?"
    assert text_to_prompt("", "fr") == "caption fr"


def test_the_last_user_message_is_the_prompt_and_other_roles_are_not_read():
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [{"type": "text", "text": "caption en"}, {"type": "image_url", "image_url": {"url": IMG}}]},
        {"role": "assistant", "content": "a cat"},
        {"role": "user", "content": [{"type": "text", "text": "what color"}, {"type": "text", "text": "is it?"}]},
    ]
    got = messages_to_prompt(messages, "en")
    # The follow-up has no image: the latest earlier user image is used.
    assert got.prompt == "answer en what color is it?" and got.image_urls == (IMG,) and got.task == "answer"


def test_images_of_the_last_user_message_win_and_keep_their_order():
    messages = [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,OLD"}}]},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,A"}},
                                     {"type": "text", "text": "detect cat"},
                                     {"type": "image_url", "image_url": "data:image/png;base64,B"}]},
    ]
    got = messages_to_prompt(messages, "en")
    assert got.image_urls == ("data:image/png;base64,A", "data:image/png;base64,B")
    assert got.prompt == "detect cat" and got.task == "detect"


@pytest.mark.parametrize("messages, needle", [
    (None, "non-empty list"),
    ([], "non-empty list"),
    (["hi"], "must be an object"),
    ([{"role": "wizard", "content": "x"}], "role must be one of"),
    ([{"role": "system", "content": "x"}], "no user message"),
    ([{"role": "user", "content": 5}], "string or a list"),
    ([{"role": "user", "content": [{"type": "input_audio"}]}], "'text' and 'image_url'"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": ""}}]}], "non-empty string"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "text must be a string"),
])
def test_malformed_messages_are_400_with_a_reason(messages, needle):
    with pytest.raises(ApiError) as e:
        messages_to_prompt(messages, "en")
    assert e.value.status == 400 and needle in e.value.message
