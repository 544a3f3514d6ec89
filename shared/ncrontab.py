"""NCRONTAB, the six-field schedule of Azure Functions timer triggers:
`second minute hour day month day-of-week`, each `*`, a number, a range `a-b`, a list `a,b`, or a
step `*/n` / `a-b/n`. Day-of-week 0 is Sunday. Used by the local host to fire timers."""

from __future__ import annotations

from datetime import datetime, timedelta

_FIELDS = (("second", 0, 59), ("minute", 0, 59), ("hour", 0, 23), ("day", 1, 31), ("month", 1, 12), ("weekday", 0, 6))


class ScheduleError(ValueError):
    pass


def _values(field: str, low: int, high: int, name: str) -> frozenset[int]:
    chosen: set[int] = set()
    for part in field.split(","):
        span, _, step_text = part.partition("/")
        step = int(step_text) if step_text else 1
        if span == "*":
            start, end = low, high
        elif "-" in span:
            start, end = (int(x) for x in span.split("-", 1))
        else:
            start = end = int(span)
        if step < 1 or not low <= start <= end <= high:
            raise ScheduleError(f"{name} field {part!r} is outside {low}-{high}")
        chosen.update(range(start, end + 1, step))
    return frozenset(chosen)


class Schedule:
    def __init__(self, expression: str) -> None:
        parts = expression.split()
        if len(parts) != len(_FIELDS):
            raise ScheduleError(f"{expression!r}: NCRONTAB has six fields (second minute hour day month weekday)")
        try:
            sets = [_values(part, low, high, name) for part, (name, low, high) in zip(parts, _FIELDS, strict=True)]
        except ValueError as error:
            raise ScheduleError(f"{expression!r}: {error}") from None
        self.expression = expression
        self.seconds, self.minutes, self.hours, self.days, self.months, self.weekdays = sets
        self._any_day, self._any_weekday = parts[3] == "*", parts[5] == "*"

    def _day_matches(self, moment: datetime) -> bool:
        weekday = (moment.weekday() + 1) % 7  # Python: Monday 0; NCRONTAB: Sunday 0
        if self._any_day or self._any_weekday:
            return moment.day in self.days and weekday in self.weekdays
        return moment.day in self.days or weekday in self.weekdays  # cron: either restricted field

    def next_after(self, moment: datetime) -> datetime:
        """The first time strictly after `moment` that the schedule fires."""
        candidate = moment.replace(microsecond=0) + timedelta(seconds=1)
        limit = candidate + timedelta(days=366 * 5)
        while candidate < limit:
            if candidate.month not in self.months or not self._day_matches(candidate):
                candidate = (candidate + timedelta(days=1)).replace(hour=0, minute=0, second=0)
            elif candidate.hour not in self.hours:
                candidate = (candidate + timedelta(hours=1)).replace(minute=0, second=0)
            elif candidate.minute not in self.minutes:
                candidate = (candidate + timedelta(minutes=1)).replace(second=0)
            elif candidate.second not in self.seconds:
                candidate += timedelta(seconds=1)
            else:
                return candidate
        raise ScheduleError(f"{self.expression!r} never fires")
