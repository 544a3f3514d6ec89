"""The chat formats datasets come in, each converted to the `messages` rows the trainers take.

Detected row by row from the fields a row has (after the upload's column mapping renames its own
field names to ours); the first row's format is the file's, and a row in another format, or one
that fits two, rejects the file with its line. The shapes are those Axolotl and LLaMA-Factory read:
- `messages`: OpenAI / ultrachat_200k, `[{"role", "content"}, ...]` (taken as it is);
- `sharegpt`: `conversations`, `[{"from": "human" | "gpt" | "system", "value"}, ...]`;
- `alpaca`: `instruction`, optional `input` (appended to it on a new line, as LLaMA-Factory does),
  `output`, optional `system`;
- `prompt_completion`: `prompt` and `completion`, strings (trl's standard form) or message lists
  (trl's conversational form);
- `turns`: one exchange in `user` and `assistant` columns, optional `system` (CSV and TSV files
  with a mapping, usually).
A `system` field adds a system message first (refused beside one the conversation has already). A
`prompt_id` a row carries is kept, as in `messages` rows."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from shared.datasets.sources import Row, UnreadableDataset

MAP_PREFIX = "map_"  # blob metadata `map_<our field>=<theirs>`; on the command line `--map <ours>=<theirs>`
MAPPABLE = ("messages", "conversations", "instruction", "input", "output", "prompt", "completion", "system",
            "user", "assistant", "prompt_id")  # fmt: skip
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

Messages = list[dict[str, Any]]
# A converter returns the messages, or (category, message) when the row cannot be converted.
Converted = Messages | tuple[str, str]


def _text(value: Any, field: str) -> str | tuple[str, str]:
    if type(value) is not str:
        return "field_not_a_string", f"'{field}' is {'null' if value is None else type(value).__name__}, not a string"
    return value


def _system(row: Mapping[str, Any]) -> Messages | tuple[str, str]:
    system = row.get("system")
    if system is None or system == "":
        return []
    text = _text(system, "system")
    return text if isinstance(text, tuple) else [{"role": "system", "content": text}]


def _exchange(row: Mapping[str, Any], user_field: str, user: Any, assistant_field: str) -> Converted:
    """[system], user, assistant: the formats that hold one exchange."""
    system = _system(row)
    question, answer = _text(user, user_field), _text(row.get(assistant_field), assistant_field)
    for problem in (system, question, answer):
        if isinstance(problem, tuple):
            return problem
    assert isinstance(system, list) and isinstance(question, str) and isinstance(answer, str)
    return [*system, {"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def _messages(row: Mapping[str, Any]) -> Converted:
    messages: Messages = row["messages"]  # what it holds, validate.check_conversation checks
    return messages


def _with_system(row: Mapping[str, Any], messages: Messages) -> Converted:
    """A row's `system` field first, unless the conversation has its own (both: refused)."""
    system = _system(row)
    if isinstance(system, tuple) or not system:
        return system or messages
    if messages and isinstance(messages[0], dict) and messages[0].get("role") == "system":
        return "field_not_a_string", "the row has a 'system' field and its conversation a system message: keep one"
    return [*system, *messages]


def _sharegpt(row: Mapping[str, Any]) -> Converted:
    turns = row["conversations"]
    if type(turns) is not list or not turns:
        return "conversations_invalid", "'conversations' is not a non-empty list of {from, value} objects"
    messages: Messages = []
    for index, turn in enumerate(turns):
        if type(turn) is not dict or "from" not in turn or "value" not in turn:
            return "conversations_invalid", f"conversations[{index}] is not a {{from, value}} object"
        role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
        if role is None:
            return "unknown_role", f"conversations[{index}].from is {turn['from']!r}; expected human, gpt or system"
        messages.append({"role": role, "content": turn["value"]})
    return _with_system(row, messages)


def _alpaca(row: Mapping[str, Any]) -> Converted:
    instruction, extra = _text(row["instruction"], "instruction"), row.get("input")
    if isinstance(instruction, tuple):
        return instruction
    if extra not in (None, ""):
        text = _text(extra, "input")
        if isinstance(text, tuple):
            return text
        instruction = f"{instruction}\n{text}"
    return _exchange(row, "instruction", instruction, "output")


def _prompt_completion(row: Mapping[str, Any]) -> Converted:
    prompt, completion = row["prompt"], row["completion"]
    if type(prompt) is list and type(completion) is list:  # trl's conversational form
        return _with_system(row, [*prompt, *completion])
    return _exchange(row, "prompt", prompt, "completion")


def _turns(row: Mapping[str, Any]) -> Converted:
    return _exchange(row, "user", row["user"], "assistant")


@dataclass(frozen=True)
class ChatFormat:
    name: str
    fields: tuple[str, ...]  # a row in this format has all of them
    convert: Callable[[Mapping[str, Any]], Converted]
    required: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "required", frozenset(self.fields))

    @property
    def label(self) -> str:
        return f"{self.name} ({'+'.join(self.fields)})"


FORMATS = (
    ChatFormat("messages", ("messages",), _messages),
    ChatFormat("sharegpt", ("conversations",), _sharegpt),
    ChatFormat("alpaca", ("instruction", "output"), _alpaca),
    ChatFormat("prompt_completion", ("prompt", "completion"), _prompt_completion),
    ChatFormat("turns", ("user", "assistant"), _turns),
)
MESSAGES = FORMATS[0]
KNOWN_FIELDS = frozenset().union(*(chat.required for chat in FORMATS))
# A messages row with any of these fits another format too: `prompt` alone is ultrachat's own.
_OTHER_FIELDS = KNOWN_FIELDS - {"messages", "prompt"}
EXPECTED = " | ".join("+".join(chat.fields) for chat in FORMATS)


class Converter:
    """Renames a row's fields by the upload's mapping, tells its format, and converts it to a
    `messages` row; the file's format is its first row's."""

    def __init__(self, mapping: Mapping[str, str] | None = None) -> None:
        self.mapping = {ours: theirs for ours, theirs in (mapping or {}).items() if ours != theirs}
        self._mapped = frozenset(self.mapping.values())
        self.format: ChatFormat | None = None

    @property
    def format_name(self) -> str:
        return self.format.name if self.format else "unknown"

    def convert(self, row: Row) -> Row:
        value = row.value
        if row.error or type(value) is not dict:
            return row  # validate.check_conversation says what is wrong with it
        if self.mapping:
            # Renamed from the row as uploaded, all at once: a swap of two columns swaps them.
            renamed = {ours: value[theirs] for ours, theirs in self.mapping.items() if theirs in value}
            value = {key: item for key, item in value.items() if key not in self._mapped} | renamed
        elif self.format is MESSAGES and "messages" in value and not value.keys() & _OTHER_FIELDS:
            return row  # the common case, as uploaded: nothing to convert
        found = [chat for chat in FORMATS if chat.required <= value.keys()]
        if len(found) > 1:
            raise UnreadableDataset(
                "ambiguous_format",
                f"line {row.line}: the row fits {' and '.join(chat.label for chat in found)}: "
                "keep the fields of one format, or rename the others with a column mapping",
            )
        if not found:
            if not value.keys() & KNOWN_FIELDS:
                fields = ", ".join(map(str, value)) or "none"
                why = f"no chat format has the row's fields ({fields}): expected {EXPECTED}, or a column mapping"
                return Row(row.line, row.value, row.raw, ("unknown_format", why))
            if self.format is MESSAGES:
                return Row(row.line, value, row.raw if value is row.value else None)  # 'messages' is missing
            near = [self.format] if self.format else [chat for chat in FORMATS if chat.required & value.keys()]
            lacks = "; ".join(f"{chat.name} needs {'+'.join(chat.fields)}" for chat in near)
            why = f"the row has {', '.join(sorted(value.keys() & KNOWN_FIELDS))} but not a whole format ({lacks})"
            return Row(row.line, row.value, row.raw, ("format_fields_missing", why))
        chat = found[0]
        if self.format is None:
            self.format = chat
        elif chat is not self.format:
            raise UnreadableDataset(
                "mixed_formats",
                f"line {row.line}: a {chat.label} row in a {self.format.label} file (its first row's): "
                "one format per file",
            )
        if chat is MESSAGES and value is row.value:
            return row
        messages = chat.convert(value)
        if isinstance(messages, tuple):
            return Row(row.line, row.value, row.raw, messages)
        converted: dict[str, Any] = {"messages": messages}
        if value.get("prompt_id") not in (None, ""):  # an empty CSV cell is no id
            converted["prompt_id"] = value["prompt_id"]
        return Row(row.line, converted)


def checked_mapping(mapping: Mapping[Any, Any], where: Callable[[str, Any], str]) -> dict[str, str]:
    """Our field -> the upload's column, each field one of ours, each column named once; raises
    ValueError with `where(field, column)` naming the entry that is wrong."""
    checked: dict[str, str] = {}
    for ours, theirs in mapping.items():
        if ours not in MAPPABLE or not isinstance(theirs, str) or not theirs.strip():
            raise ValueError(f"{where(ours, theirs)}: a column mapping maps one of {', '.join(MAPPABLE)} to a column")
        if theirs.strip() in checked.values():
            raise ValueError(f"{where(ours, theirs)}: column {theirs.strip()!r} is mapped twice")
        checked[ours] = theirs.strip()
    return checked


def mapping_from(metadata: Mapping[str, str]) -> dict[str, str]:
    """The column mapping in blob metadata (`map_user=question`): our field -> the upload's.
    Raises ValueError naming a key that is wrong."""
    keys = {key[len(MAP_PREFIX) :].lower(): key for key in metadata if key.lower().startswith(MAP_PREFIX)}
    return checked_mapping(
        {ours: metadata[key] for ours, key in keys.items()},
        lambda ours, theirs: f"{keys[ours]}={theirs!r}",
    )
