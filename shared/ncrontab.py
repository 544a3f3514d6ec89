"""NCRONTAB, the schedule of Azure Functions timer triggers, as the host reads it: six fields
`second minute hour day month day-of-week`, or five without the seconds. Each field is `*`, a
value, a range `a-b`, a list `a,b` or a step `*/n`, `a-b/n`; months and days of the week may be
named (`Jan`, `Mon-Fri`, `Monday`); day-of-week 0 is Sunday. As in NCrontab (whose next-occurrence
search matches the day of the month, then requires the day of the week too), a schedule that
restricts both fires on days that match both, not, as in Unix cron, either.

The grammar check here refuses what the host's NCrontab library refuses but croniter (which
computes the firing times) would take: Quartz-style `L`, `W`, `#`, `?` and Jenkins' `H`."""

from __future__ import annotations

import re
from datetime import datetime

_MONTHS = ("january", "february", "march", "april", "may", "june", "july", "august", "september",
           "october", "november", "december")  # fmt: skip
_DAYS = ("sunday", "monday", "tuesday", "wednesday", "thursday", "friday", "saturday")
_FIELDS = ("second", "minute", "hour", "day", "month", "day-of-week")
_VALUE = r"(?:\d+|[A-Za-z]{3,})"
_TERM = re.compile(rf"^(?:\*|{_VALUE}(?:-{_VALUE})?)(?:/\d+)?$")


class ScheduleError(ValueError):
    pass


def _short_names(field: str, names: tuple[str, ...], label: str) -> str:
    """Full or abbreviated names as croniter's three-letter ones."""

    def short(match: re.Match[str]) -> str:
        word = match.group(0).lower()
        if not any(name.startswith(word) for name in names):
            raise ScheduleError(f"{label} field has an unknown name {match.group(0)!r}")
        return word[:3]

    return re.sub(r"[A-Za-z]+", short, field)


def _normalised(expression: str) -> str:
    parts = expression.split()
    if len(parts) == 5:
        parts = ["0", *parts]  # the host reads five fields as a schedule without seconds
    if len(parts) != 6:
        raise ScheduleError(
            f"{expression!r}: NCRONTAB has six fields (second minute hour day month day-of-week) or five"
        )
    for part, label in zip(parts, _FIELDS, strict=True):
        if not all(_TERM.match(term) for term in part.split(",")):
            raise ScheduleError(f"{expression!r}: {label} field {part!r} is not NCRONTAB")
    parts[4] = _short_names(parts[4], _MONTHS, "month")
    parts[5] = _short_names(parts[5], _DAYS, "day-of-week")
    if any(int(value) > 6 for value in re.findall(r"(?<![/\d])\d+", parts[5])):
        raise ScheduleError(f"{expression!r}: day-of-week runs from 0 (Sunday) to 6 (Saturday)")
    for label, part in zip(_FIELDS, parts, strict=True):
        if label not in {"month", "day-of-week"} and re.search(r"[A-Za-z]", part):
            raise ScheduleError(f"{expression!r}: only months and days of the week have names")
    return " ".join(parts)


class Schedule:
    """A validated schedule and its firing times (computed by croniter)."""

    def __init__(self, expression: str) -> None:
        from croniter import croniter

        self.expression = expression
        self._cron = _normalised(expression)
        if not croniter.is_valid(self._cron, second_at_beginning=True):
            raise ScheduleError(f"{expression!r}: a value is out of range")
        self.next_after(datetime(2000, 1, 1))  # one that never fires (the 30th of February) is refused now

    def next_after(self, moment: datetime) -> datetime:
        """The first time strictly after `moment` that the schedule fires."""
        from croniter import CroniterBadDateError, croniter

        try:
            fires: datetime = croniter(self._cron, moment, day_or=False, second_at_beginning=True).get_next(datetime)
        except CroniterBadDateError:
            raise ScheduleError(f"{self.expression!r} never fires") from None
        return fires
