"""The rules one conversation must meet to be trained on, each with a category and a message a
user can act on. This is the hot loop of preparation: plain code, no allocation it can avoid."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import orjson

ROLES = ("user", "assistant", "system")
CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 3  # role marker, <|end|>, line break in the Phi-3 chat template

ERROR_CATEGORIES = {
    "json_array": "the file is one JSON array, not JSON Lines",
    "unreadable_gzip": "the gzip file is damaged",
    "unreadable_parquet": "the Parquet file cannot be read",
    "line_too_long": "a line is too long to be one conversation",
    "invalid_json": "the line is not valid JSON",
    "invalid_utf8": "the line is not valid UTF-8",
    "not_an_object": "the line is not a JSON object",
    "messages_missing": "'messages' is missing",
    "messages_not_a_list": "'messages' is not a non-empty list",
    "message_not_an_object": "a message is not an object",
    "message_missing_field": "a message lacks 'role' or 'content'",
    "unknown_role": "a message's role is not user, assistant or system",
    "content_not_a_string": "a message's content is not a string",
    "empty_content": "a message's content is empty or only white space",
    "system_not_first": "a system message is not the first message",
    "no_assistant_message": "the conversation has no assistant message",
    "prompt_id_invalid": "'prompt_id' is not a non-empty string",
    "prompt_invalid": "'prompt' is not a string",
    "unknown_format": "the row's fields fit no chat format",
    "format_fields_missing": "the row lacks the fields of the file's chat format",
    "field_not_a_string": "a field of the chat format is not a string",
    "conversations_invalid": "ShareGPT 'conversations' is not a list of {from, value} objects",
    "ambiguous_format": "a row fits two chat formats",
    "mixed_formats": "rows of different chat formats in one file",
    "unreadable_csv": "the CSV or TSV file cannot be read",
    "csv_field_count": "a CSV or TSV record has more or fewer fields than the header",
    "reference_invalid": "the dataset reference is not valid",
    "dataset_unreachable": "the referenced dataset cannot be read",
}
WARNING_CATEGORIES = {
    "consecutive_same_role": "two consecutive messages have the same role",
    "ends_with_user_turn": "the conversation ends with a user turn, which is dropped for training",
    "over_max_seq_length": "the conversation is estimated longer than max_seq_length and would be truncated",
    "duplicate_prompt_id": "the same prompt_id appears earlier: kept once",
    "duplicate_conversation": "the same conversation appears earlier: kept once",
}


@dataclass(slots=True)
class Checked:
    """The outcome of checking one conversation."""

    errors: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[tuple[str, str]] = field(default_factory=list)
    changed: bool = False  # the row written for training differs from the uploaded one
    row: dict[str, Any] | None = None
    prompt_id: str = ""
    characters: int = 0
    turns: int = 0
    content_key: int = 0  # equal for conversations with the same messages (within one process)

    @property
    def estimated_tokens(self) -> int:
        return -(-self.characters // CHARS_PER_TOKEN) + TOKENS_PER_MESSAGE * self.turns


def conversation_id(messages: list[dict[str, Any]]) -> str:
    """A stable id for a conversation that has no prompt_id: sha256 of its canonical JSON."""
    canonical = [{"role": m["role"], "content": m["content"]} for m in messages]
    return hashlib.sha256(orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS)).hexdigest()


def check_conversation(value: Any) -> Checked:
    """Check one parsed row against every rule; report all problems, not just the first."""
    checked = Checked()
    errors = checked.errors
    if type(value) is not dict:
        errors.append(("not_an_object", f"the line is {_kind(value)}, not a JSON object"))
        return checked
    messages = value.get("messages")
    if messages is None:
        errors.append(("messages_missing", "'messages' is missing (expected a list of {role, content} objects)"))
        return checked
    if type(messages) is not list or not messages:
        errors.append(("messages_not_a_list", f"'messages' is {_kind(messages)}; expected a non-empty list"))
        return checked

    previous_role = None
    has_assistant = False
    characters = 0
    content_key = 0
    for index, message in enumerate(messages):
        if type(message) is not dict:
            errors.append(("message_not_an_object", f"messages[{index}] is {_kind(message)}, not an object"))
            previous_role = None
            continue
        role = message.get("role")
        content = message.get("content")
        if role is None or content is None:
            missing = " and ".join(key for key in ("role", "content") if message.get(key) is None)
            errors.append(("message_missing_field", f"messages[{index}] has no '{missing}'"))
        if role is not None and role not in ROLES:
            errors.append(("unknown_role", f"messages[{index}].role is {role!r}; expected user, assistant or system"))
        if content is not None:
            if type(content) is not str:
                errors.append(("content_not_a_string", f"messages[{index}].content is {_kind(content)}, not a string"))
            elif not content or content.isspace():
                errors.append(("empty_content", f"messages[{index}].content is empty"))
            else:
                characters += len(content)
                content_key = hash((content_key, role, content))
        if role == "system" and index:
            errors.append(("system_not_first", f"messages[{index}] is a system message; only the first may be"))
        elif role == "assistant":
            has_assistant = True
        if role is not None and role == previous_role:
            checked.warnings.append(("consecutive_same_role", f"messages[{index - 1}] and [{index}] are both {role}"))
        previous_role = role
    if not has_assistant:
        errors.append(("no_assistant_message", "no message has role 'assistant': there is nothing to learn"))

    prompt_id = value.get("prompt_id")
    if prompt_id is not None and (type(prompt_id) is not str or not prompt_id):
        errors.append(("prompt_id_invalid", f"'prompt_id' is {_kind(prompt_id)}; expected a non-empty string"))
    prompt = value.get("prompt")
    if prompt is not None and type(prompt) is not str:
        errors.append(("prompt_invalid", f"'prompt' is {_kind(prompt)}; expected a string"))
    if errors:
        return checked

    checked.row = value
    if messages[-1]["role"] == "user":
        last = len(messages)
        while messages[last - 1]["role"] == "user":
            last -= 1
        dropped = len(messages) - last
        checked.warnings.append(("ends_with_user_turn", f"the last {dropped} user message(s) are dropped"))
        messages = messages[:last]
        characters -= sum(len(m["content"]) for m in value["messages"][last:])
        checked.row = {**value, "messages": messages}
        checked.changed = True
    if prompt is None or prompt_id is None:
        first_user = next((m["content"] for m in messages if m["role"] == "user"), "")
        derived = {
            "prompt": first_user if prompt is None else prompt,
            "prompt_id": prompt_id or conversation_id(messages),
        }
        checked.row = {**derived, **{k: v for k, v in checked.row.items() if k not in derived}}
        checked.changed = True
    checked.prompt_id = checked.row["prompt_id"]
    checked.content_key = content_key
    checked.characters = characters
    checked.turns = len(messages)
    return checked


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "true/false",
        int: "a number",
        float: "a number",
    }.get(type(value), type(value).__name__)
