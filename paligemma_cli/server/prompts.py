"""How OpenAI chat messages become one PaliGemma prompt.

PaliGemma is not a chat model: it reads image blocks and one task prefix ("caption en", "answer en what
is this?", "detect cat ; dog", "ocr") and answers once, with no memory of earlier turns. So:

- The prompt comes from the **last user message**. System, developer, assistant and tool messages and
  earlier user messages are not read: the model was never trained to use them.
- Its text parts are joined with spaces, and runs of whitespace (newlines included) become one space:
  the prefix ends at the newline PaliGemma's prompt format puts after it.
- A text whose first word is a task word (`caption`, `describe`, `ocr`, `answer`, `question`, `detect`,
  `segment`, lowercase as PaliGemma was trained) is sent as it is. Any other text is a question and is
  sent as `answer {lang} {text}`. No text at all means `caption {lang}`.
- The images are the image parts of the last user message, in order; if it has none, those of the latest
  earlier user message that has some (a chat UI sends the image once, then follow-up questions alone).
"""

from __future__ import annotations

from dataclasses import dataclass

from paligemma_cli.server.errors import bad_request

TASK_WORDS = frozenset({"caption", "describe", "ocr", "answer", "question", "detect", "segment"})
ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


@dataclass(frozen=True)
class ChatPrompt:
    prompt: str  # the raw PaliGemma prefix
    image_urls: tuple[str, ...]
    task: str  # the prompt's first word: "answer", "detect", ...


def text_to_prompt(text: str, lang: str) -> str:
    """The PaliGemma prefix for a user's text (see the module docstring)."""
    text = " ".join(text.split())
    if not text:
        return f"caption {lang}"
    if text.split(" ", 1)[0] in TASK_WORDS:
        return text
    return f"answer {lang} {text}"


def messages_to_prompt(messages, lang: str) -> ChatPrompt:
    """The prompt and image URLs of a chat request's `messages`. Raises ApiError 400 for a malformed list."""
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list", "messages")
    parsed = [_message(m, i) for i, m in enumerate(messages)]
    users = [(texts, images) for role, texts, images in parsed if role == "user"]
    if not users:
        raise bad_request("messages has no user message: PaliGemma answers the last user message", "messages")
    texts, images = users[-1]
    if not images:
        images = next((imgs for _, imgs in reversed(users) if imgs), [])
    prompt = text_to_prompt(" ".join(texts), lang)
    return ChatPrompt(prompt, tuple(images), prompt.split(" ", 1)[0])


def _message(message, i: int) -> tuple[str, list[str], list[str]]:
    """(role, texts, image URLs) of one message."""
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise bad_request(f"{where} must be an object with 'role' and 'content'", where)
    role = message.get("role")
    if role not in ROLES:
        raise bad_request(f"{where}.role must be one of {', '.join(sorted(ROLES))}", f"{where}.role")
    content = message.get("content")
    if content is None or isinstance(content, str):
        return role, [content or ""], []
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or a list of content parts", f"{where}.content")
    texts, images = [], []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise bad_request(f"{at}.text must be a string", at)
            texts.append(part["text"])
        elif kind == "image_url":
            spec = part.get("image_url")
            url = spec.get("url") if isinstance(spec, dict) else spec
            if not isinstance(url, str) or not url:
                raise bad_request(f"{at}.image_url.url must be a non-empty string", at)
            images.append(url)
        else:
            raise bad_request(f"{at} has type {kind!r}: PaliGemma reads 'text' and 'image_url' parts", at)
    return role, texts, images
