"""Azure ML's `/score` contract for chat models (the local endpoint serves it too): the request
shapes serving containers take, the answers they give, and a request tried in each shape in turn
(the evaluation gate asks its held-out conversations so).

Two request shapes are documented, and which one a deployment takes depends on its serving
container: the current foundation-model serving container (azureml-assets,
`foundation-model-serve`, `managed_inference.py`) takes `input_string` as a flat list of
messages; the MLflow scoring of fine-tuned chat models (azureml-examples `chat-completion`
notebook) takes a list of conversations plus `params`. Answers come as `{"output": ...}`, as
OpenAI-style `choices`, or as pandas records (`[{"0": ...}]`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shared.backends.interface import Conversation


@dataclass(frozen=True)
class Attempt:
    """One request in one of the documented shapes: the shape, the HTTP status (None: no answer),
    the start of the body, and the text answered (None: no answer in a shape this app reads)."""

    shape: str
    status: int | None
    excerpt: str
    text: str | None

    @property
    def answered(self) -> bool:
        return self.text is not None


EXCERPT_CHARS = 300


def _flat(messages: Conversation, parameters: dict[str, Any]) -> dict[str, Any]:
    return {"input_data": {"input_string": messages, "parameters": parameters}}


def _nested(messages: Conversation, parameters: dict[str, Any]) -> dict[str, Any]:
    return {"input_data": {"input_string": [messages], "parameters": parameters}, "params": {}}


# In the order they are tried: the current serving container first.
REQUEST_SHAPES: tuple[tuple[str, Callable[[Conversation, dict[str, Any]], dict[str, Any]]], ...] = (
    ("input_string as a list of messages", _flat),
    ("input_string as a list of conversations, with params", _nested),
)


def reply_text(reply: Any) -> str | None:
    """The generated text of any documented answer shape, or None when the shape is not one."""
    if isinstance(reply, dict):
        if "output" in reply:
            output = reply["output"]
            return reply_text(output) if isinstance(output, list) else None if output is None else str(output)
        choices = reply.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            message = choices[0].get("message")
            text = message.get("content") if isinstance(message, dict) else choices[0].get("text")
            return None if text is None else str(text)
        if "0" in reply:
            return str(reply["0"])
        return None
    if isinstance(reply, list) and reply:
        first = reply[0]
        return str(first) if isinstance(first, str) else reply_text(first)
    if isinstance(reply, str):
        return reply
    return None


def excerpt(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= EXCERPT_CHARS else flat[: EXCERPT_CHARS - 3] + "..."


def run(
    send: Callable[[dict[str, Any]], tuple[int | None, str]], messages: Conversation, parameters: dict[str, Any]
) -> tuple[Attempt, ...]:
    """Send the conversation with the generation `parameters` in each request shape until one is
    answered with text; `send` returns the HTTP status (None when no answer came) and the body.
    Every attempt is kept."""
    attempts = []
    for shape, build in REQUEST_SHAPES:
        status, body = send(build(messages, parameters))
        text = _answer(body) if status is not None and 200 <= status < 300 else None
        attempts.append(Attempt(shape, status, excerpt(body), text))
        if text is not None:
            break
    return tuple(attempts)


def _answer(body: str) -> str | None:
    try:
        return reply_text(json.loads(body))
    except ValueError:
        return None
