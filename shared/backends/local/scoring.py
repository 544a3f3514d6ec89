"""Request bodies of a chat endpoint: Azure ML's scoring schema and OpenAI's chat completions
schema, checked with messages a caller can act on. No model here: this is what the server and its
tests share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared.backends.local.engine import Sampling

MAX_NEW_TOKENS = 2048
MAX_STOP_STRINGS = 4
ROLES = ("system", "user", "assistant")
# OpenAI's newer name for the system role; the chat template knows only the three above.
ROLE_ALIASES = {"developer": "system"}
# OpenAI fields a text chat model cannot honour: refused by name rather than silently ignored.
UNSUPPORTED = ("tools", "functions", "tool_choice", "audio", "logit_bias")


class BadRequest(ValueError):
    """The request body is not one the endpoint accepts; the message says why, `param` where."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict[str, str]]
    max_new_tokens: int = 200
    sampling: Sampling | None = None  # None: greedy decoding
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    model: str | None = None  # OpenAI's `model`: which of the endpoints behind a key is meant


def _content(value: Any, where: str) -> str:
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:  # JSON can carry half a surrogate pair; no tokenizer can
            raise BadRequest(f"{where}.content is not valid Unicode text", f"{where}.content") from None
        return value
    # OpenAI's content parts: [{"type": "text", "text": "..."}]; only text is understood here.
    if isinstance(value, list) and all(isinstance(part, dict) and part.get("type") == "text" for part in value):
        texts = [part.get("text") for part in value]
        if all(isinstance(text, str) for text in texts):
            return _content("".join(texts), where)
    raise BadRequest(f"{where}.content must be a string or a list of text parts", where)


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise BadRequest(f"{where} must be a non-empty list of {{role, content}} messages", where)
    messages = []
    for index, message in enumerate(value):
        at = f"{where}[{index}]"
        if not isinstance(message, dict):
            raise BadRequest(f"{at} must be an object with 'role' and 'content'", at)
        role = ROLE_ALIASES.get(message.get("role"), message.get("role"))  # type: ignore[arg-type]
        if role not in ROLES:
            raise BadRequest(f"{at}.role must be one of {', '.join(ROLES)}", f"{at}.role")
        messages.append({"role": role, "content": _content(message.get("content"), at)})
    return messages


def _number(parameters: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = parameters.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise BadRequest(f"parameter {name} must be a number from {low} to {high}", name)
    return float(value)


def _whole(parameters: dict[str, Any], name: str) -> int | None:
    value = parameters.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise BadRequest(f"parameter {name} must be a whole number", name)
    return value


def _max_new_tokens(parameters: dict[str, Any], *names: str) -> int:
    given = [name for name in names if parameters.get(name) is not None]
    name = given[0] if given else names[0]
    return int(_number(parameters, name, 200, 1, MAX_NEW_TOKENS))


def _sampling(parameters: dict[str, Any], temperature: float, sample: bool) -> Sampling | None:
    top_p = _number(parameters, "top_p", 1.0, 0.0, 1.0)
    if not sample or temperature == 0:
        return None
    return Sampling(temperature, top_p or 1.0, _whole(parameters, "seed"))


def parse_score(body: Any) -> ChatRequest:
    """Azure ML's chat body: `{"input_data": {"input_string": [messages] | [[messages]],
    "parameters": {...}}}` (the walkthrough wraps the conversation in one more list). Greedy
    unless the parameters ask for sampling, as on Azure ML's chat models."""
    if not isinstance(body, dict) or not isinstance(body.get("input_data"), dict):
        raise BadRequest('the body must be {"input_data": {"input_string": [messages], "parameters": {...}}}')
    data = body["input_data"]
    conversation = data.get("input_string")
    if isinstance(conversation, list) and len(conversation) == 1 and isinstance(conversation[0], list):
        conversation = conversation[0]
    messages = _messages(conversation, "input_data.input_string")
    parameters = data.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise BadRequest("input_data.parameters must be an object", "input_data.parameters")
    temperature = _number(parameters, "temperature", 1.0, 0.0, 5.0)
    do_sample = parameters.get("do_sample", "temperature" in parameters and temperature > 0)
    if not isinstance(do_sample, bool):
        raise BadRequest("parameter do_sample must be true or false", "do_sample")
    return ChatRequest(
        messages,
        max_new_tokens=_max_new_tokens(parameters, "max_new_tokens"),
        sampling=_sampling(parameters, temperature, do_sample),
    )


def parse_openai(body: Any) -> ChatRequest:
    """OpenAI's chat completions body. As on OpenAI, `temperature` defaults to 1 (sampling);
    0 is greedy decoding."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object with 'messages'")
    messages = _messages(body.get("messages"), "messages")
    for name in UNSUPPORTED:
        if body.get(name):
            raise BadRequest(f"parameter {name} is not supported by this endpoint", name, "unsupported_parameter")
    if body.get("n") not in (None, 1):
        raise BadRequest("parameter n must be 1: this endpoint returns one choice", "n")
    if body.get("logprobs"):
        raise BadRequest("parameter logprobs is not supported by this endpoint", "logprobs", "unsupported_parameter")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise BadRequest("parameter stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise BadRequest('parameter stream_options must be {"include_usage": true|false}', "stream_options")
    if options and not stream:
        raise BadRequest("parameter stream_options is only allowed with stream: true", "stream_options")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest("parameter model must be a string", "model")
    return ChatRequest(
        messages,
        max_new_tokens=_max_new_tokens(body, "max_completion_tokens", "max_tokens"),
        sampling=_sampling(body, _number(body, "temperature", 1.0, 0.0, 2.0), sample=True),
        stop=_stop(body.get("stop")),
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
        model=model,
    )


def _stop(value: Any) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value if value is not None else []
    if not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stops):
        raise BadRequest(f"parameter stop must be a string or a list of up to {MAX_STOP_STRINGS} non-empty strings",
                         "stop")  # fmt: skip
    return tuple(stops)
