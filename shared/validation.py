"""How text from outside (app settings, blob metadata, `--set`) becomes typed values: a `Rule`
says what a value expects (in words, for the error) and how it is parsed; a parser raises
ValueError for anything it refuses. Settings, training parameters and the Azure ML component's
inputs are all checked with these."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, TypeVar

T = TypeVar("T")


class Rule(NamedTuple):
    """What a value expects (said in errors) and how its text is parsed."""

    expects: str
    parse: Callable[[str], Any]


def checked(convert: Callable[[str], T], accept: Callable[[T], bool]) -> Callable[[str], T]:
    """A parser that converts, then refuses values outside what `accept` allows."""

    def parse(value: str) -> T:
        converted = convert(value)
        if not accept(converted):
            raise ValueError(value)
        return converted

    return parse


def one_of(options: tuple[str, ...], fold_case: bool = True) -> Callable[[str], str]:
    def parse(value: str) -> str:
        found = next((o for o in options if (o.lower() == value.lower() if fold_case else o == value)), None)
        if found is None:
            raise ValueError(value)
        return found

    return parse


def flag(value: str) -> bool:
    lowered = str(value).strip().lower()
    if lowered not in ("true", "false"):
        raise ValueError(value)
    return lowered == "true"


def whole_number(value: str) -> int:
    """An integer, also when written as a float with nothing after the point ("2.0")."""
    if isinstance(value, bool) or float(value) != int(float(value)):
        raise ValueError(value)
    return int(float(value))


def http_uri(value: str) -> str:
    if not re.match(r"^https?://[^/\s]+", value):
        raise ValueError(value)
    return value.rstrip("/")


def price_table(value: str) -> dict[str, float]:
    """`size=price,size=price`: prices at least 0."""
    table = {}
    for entry in value.split(","):
        size, equals, price = entry.strip().partition("=")
        if not entry.strip():
            continue
        if not equals or not size.strip() or float(price) < 0:
            raise ValueError(entry)
        table[size.strip()] = float(price)
    return table


def resource_name(value: str) -> str:
    """An Azure ML endpoint or deployment name (the local backend keeps the same rule)."""
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9-]{1,30}[A-Za-z0-9]", value):
        raise ValueError(value)
    return value


RESOURCE_NAME = Rule(
    "3-32 characters: a letter first, then letters, digits and hyphens, ending with a letter or digit",
    resource_name,
)


def matching(pattern: str) -> Callable[[str], str]:
    """A parser that takes the whole text only if it all matches `pattern` (a line end included)."""
    compiled = re.compile(pattern)

    def parse(value: str) -> str:
        if not compiled.fullmatch(value):
            raise ValueError(value)
        return value

    return parse


# A job's name: also a folder name on this machine (a local job's), so a safe set; Azure ML's job
# names take the same characters.
JOB_NAME = Rule(
    "1-255 characters: letters, digits, '-' and '_', starting with a letter or digit",
    matching(r"[A-Za-z0-9][A-Za-z0-9_-]{0,254}"),
)
# A registered model's name and version, as Azure ML's model registry takes them.
MODEL_NAME = Rule(
    "1-255 characters: letters, digits, '-', '_' and '.', starting with a letter or digit",
    matching(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}"),
)
MODEL_VERSION = Rule("letters, digits, '-', '_' and '.' (a local model's version is a number)",
                     matching(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"))  # fmt: skip
POSITIVE_INT = Rule("a whole number, at least 1", checked(int, lambda number: number >= 1))
TEST_PERCENT = Rule("a percentage above 0 and below 100", checked(float, lambda number: 0 < number < 100))
USD = Rule("an amount in US dollars, at least 0 (0: no limit)", checked(float, lambda number: number >= 0))
SAMPLE_PERCENT = Rule("a percentage above 0, at most 100", checked(float, lambda number: 0 < number <= 100))


class SettingsReader:
    """Reads values from a mapping (the environment), collecting every problem instead of
    stopping at the first, and remembering which names it looked at."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ
        self.errors: list[str] = []
        self.names_read: set[str] = set()

    def raw(self, name: str) -> str | None:
        self.names_read.add(name)
        value = self._environ.get(name)
        if value is None or value.strip() == "":
            return None
        return value.strip()

    def parsed(self, name: str, default: T, rule: Rule) -> T:
        value = self.raw(name)
        if value is None:
            return default
        try:
            parsed: T = rule.parse(value)
        except ValueError:
            self.errors.append(f"{name}={value!r}: expected {rule.expects}")
            return default
        return parsed

    def required(self, name: str, expects: str) -> str:
        value = self.raw(name)
        if value is None:
            self.errors.append(f"{name} is not set: expected {expects}")
            return ""
        return value
