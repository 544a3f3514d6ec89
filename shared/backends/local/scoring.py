"""Request bodies of a chat endpoint: Azure ML's scoring schema and OpenAI's chat schema, checked
with messages a caller can act on. No model here: this is what the server and its tests share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MAX_NEW_TOKENS = 2048
ROLES = ("system", "user", "assistant")


class BadRequest(ValueError):
    """The request body is not one the endpoint accepts; the message says why."""


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict[str, str]]
    max_new_tokens: int = 200
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise BadRequest(f"{where} must be a non-empty list of {{role, content}} messages")
    for index, message in enumerate(value):
        if not isinstance(message, dict):
            raise BadRequest(f"{where}[{index}] must be an object with 'role' and 'content'")
        if message.get("role") not in ROLES:
            raise BadRequest(f"{where}[{index}].role must be one of {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise BadRequest(f"{where}[{index}].content must be a string")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _number(parameters: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = parameters.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise BadRequest(f"parameter {name} must be a number from {low} to {high}")
    return float(value)


def _generation(parameters: Any, max_tokens_key: str) -> dict[str, Any]:
    if not isinstance(parameters, dict):
        raise BadRequest("parameters must be an object")
    temperature = _number(parameters, "temperature", 1.0, 0.0, 5.0)
    do_sample = parameters.get("do_sample", temperature > 0 and "temperature" in parameters)
    if not isinstance(do_sample, bool):
        raise BadRequest("parameter do_sample must be true or false")
    max_new_tokens = _number(parameters, max_tokens_key, 200, 1, MAX_NEW_TOKENS)
    return {
        "max_new_tokens": int(max_new_tokens),
        "do_sample": do_sample and temperature > 0,
        "temperature": temperature if temperature > 0 else 1.0,
        "top_p": _number(parameters, "top_p", 1.0, 0.0, 1.0) or 1.0,
    }


def parse_score(body: Any) -> ChatRequest:
    """Azure ML's chat body: `{"input_data": {"input_string": [messages] | [[messages]],
    "parameters": {...}}}` (the walkthrough wraps the conversation in one more list)."""
    if not isinstance(body, dict) or not isinstance(body.get("input_data"), dict):
        raise BadRequest('the body must be {"input_data": {"input_string": [messages], "parameters": {...}}}')
    data = body["input_data"]
    conversation = data.get("input_string")
    if isinstance(conversation, list) and len(conversation) == 1 and isinstance(conversation[0], list):
        conversation = conversation[0]
    messages = _messages(conversation, "input_data.input_string")
    return ChatRequest(messages, **_generation(data.get("parameters", {}), "max_new_tokens"))


def parse_openai(body: Any) -> ChatRequest:
    """OpenAI's chat completions body: `{"messages": [...], "max_tokens": N, "temperature": T, ...}`."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object with 'messages'")
    return ChatRequest(_messages(body.get("messages"), "messages"), **_generation(body, "max_tokens"))
