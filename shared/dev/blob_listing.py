"""Listing a container in Azurite whatever its blobs are called. Azure encodes a blob name that XML
cannot carry (a control character) in its listings; Azurite answers 500 to every page that holds
one, and to any listing whose marker holds one, so one odd upload would hide every later one
from the local host. This lists page by page and steps over such a name: a listing resumes after
its marker (Azurite's marker is the last name returned), so the odd name's start, up to the
character XML cannot carry, is found a character at a time by bisection over markers, and the
listing goes on from just past it. The odd blob itself cannot be named: it is reported by that
start and skipped."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger(__name__)

PAGE = 100
# The characters XML 1.0 can carry, in order: the only ones a marker may hold.
_XML_CHARACTERS = ((0x9, 0xA), (0xD, 0xD), (0x20, 0xD7FF), (0xE000, 0xFFFD), (0x10000, 0x10FFFF))
_ABOVE_ALL = chr(0x10FFFF)  # appended to a prefix: after every name that starts with it
MAX_NAME = 1024  # Azure's limit on a blob name


def _character(index: int) -> str:
    """The index-th character XML can carry."""
    for first, last in _XML_CHARACTERS:
        if index <= last - first:
            return chr(first + index)
        index -= last - first + 1
    raise IndexError(index)


def _index(character: str) -> int:
    """The index of the first character XML can carry that is not below `character`."""
    code, index = ord(character), 0
    for first, last in _XML_CHARACTERS:
        if code <= last:
            return index + max(code - first, 0)
        index += last - first + 1
    return index


_COUNT = _index(_ABOVE_ALL) + 1


def list_blobs(client: Any, on_unlistable: Callable[[str], None], known: dict[str, tuple[str, str]]) -> Iterator[Any]:
    """Every blob of `client` (a ContainerClient) that Azurite can list, in name order. Each one
    it cannot is reported to `on_unlistable` by the start of its name, and skipped. `known`
    remembers, between calls, which odd name follows which marker."""
    from azure.core.exceptions import HttpResponseError

    marker: str | None = None
    while True:
        try:
            blobs, marker = _page(client, marker, PAGE)
        except HttpResponseError:
            # Walk one blob at a time to the name that breaks the page, then past it.
            while (step := _one(client, marker)) is not None:
                listed, marker = step
                yield from listed
                if not marker:
                    return
            after = marker or ""
            if after not in known or _one(client, known[after][1]) is None:
                known[after] = find_odd_name(lambda candidate: _one(client, candidate) is not None, after)
            start, marker = known[after]
            on_unlistable(start)
            if marker <= after:  # never: the search always lands past `after`; but never loop either
                return
            continue
        yield from blobs
        if not marker:
            return


def _page(client: Any, marker: str | None, size: int) -> tuple[list[Any], str | None]:
    # No retries: Azurite's 500 here is an answer (the page holds an odd name), not a hiccup.
    pages = client.list_blobs(results_per_page=size, retry_total=0).by_page(continuation_token=marker)
    blobs = list(next(pages))
    return blobs, pages.continuation_token


def _one(client: Any, marker: str | None) -> tuple[list[Any], str | None] | None:
    """The blob after `marker`, or None when Azurite cannot list it."""
    from azure.core.exceptions import HttpResponseError

    try:
        return _page(client, marker, 1)
    except HttpResponseError:
        return None


def find_odd_name(listable_after: Callable[[str], bool], after: str) -> tuple[str, str]:
    """(the start of the odd name that follows `after`, up to its first character XML cannot
    carry; a marker just past it). `listable_after(marker)` says whether a one-blob listing from
    `marker` works: from `after` up to the odd name it does not, past it it does."""
    prefix = ""
    while len(prefix) < MAX_NAME:
        # The smallest next character c with (prefix + c + above all) past the odd name.
        low = _index(after[len(prefix)]) if after.startswith(prefix) and len(after) > len(prefix) else 0
        high = _COUNT - 1
        while low < high:
            middle = (low + high) // 2
            if listable_after(prefix + _character(middle) + _ABOVE_ALL):
                high = middle
            else:
                low = middle + 1
        candidate = prefix + _character(low)
        # Past the odd name already (and not merely before `after`): its next character is not XML.
        if not after.startswith(candidate) and listable_after(candidate):
            return prefix, candidate
        prefix = candidate
    return prefix, prefix + _ABOVE_ALL
