"""Cron schedules for ``peregrine batch --schedule``.

Five fields, minute hour day-of-month month day-of-week (0 or 7 is Sunday), each ``*``, a
number, a range ``a-b``, a step ``*/n`` or ``a-b/n``, or a list of those separated by commas.
A sixth field in front gives seconds (``*/10 * * * * *``: every ten seconds). As in cron,
when both day fields are restricted a day matching either one matches. Times are local.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

_FIELDS = (("second", 0, 59), ("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31),
           ("month", 1, 12), ("day of week", 0, 7))


@dataclass(frozen=True, slots=True)
class Cron:
    seconds: frozenset[int]
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]
    any_day: bool
    any_weekday: bool

    def matches(self, moment: datetime.datetime) -> bool:
        if moment.second not in self.seconds or moment.minute not in self.minutes \
                or moment.hour not in self.hours or moment.month not in self.months:
            return False
        return self._day_matches(moment)

    def next_after(self, moment: datetime.datetime) -> datetime.datetime:
        """The first matching second strictly after ``moment``."""
        step = datetime.timedelta(seconds=1)
        probe = moment.replace(microsecond=0) + step
        limit = probe + datetime.timedelta(days=366 * 5)
        while probe < limit:
            if probe.month not in self.months:
                probe = _next_month(probe)
            elif not self._day_matches(probe):
                probe = (probe + datetime.timedelta(days=1)).replace(hour=0, minute=0, second=0)
            elif probe.hour not in self.hours:
                probe = (probe + datetime.timedelta(hours=1)).replace(minute=0, second=0)
            elif probe.minute not in self.minutes:
                probe = (probe + datetime.timedelta(minutes=1)).replace(second=0)
            elif probe.second not in self.seconds:
                probe += step
            else:
                return probe
        raise ValueError("the schedule never fires")

    def _day_matches(self, moment: datetime.datetime) -> bool:
        day = moment.day in self.days
        weekday = (moment.isoweekday() % 7) in self.weekdays
        if self.any_day or self.any_weekday:
            return day and weekday
        return day or weekday


def _next_month(moment: datetime.datetime) -> datetime.datetime:
    year, month = (moment.year + 1, 1) if moment.month == 12 else (moment.year, moment.month + 1)
    return moment.replace(year=year, month=month, day=1, hour=0, minute=0, second=0)


def parse(text: str) -> Cron:
    fields = text.split()
    if len(fields) == 5:
        fields = ["0", *fields]
    if len(fields) != 6:
        raise ValueError(f"schedule {text!r}: need 5 fields (minute hour day month weekday), "
                         "or 6 with seconds first")
    values = [_field(f, name, low, high)
              for f, (name, low, high) in zip(fields, _FIELDS, strict=True)]
    weekdays = frozenset(0 if d == 7 else d for d in values[5])
    return Cron(values[0], values[1], values[2], values[3], values[4], weekdays,
                any_day=fields[3] == "*", any_weekday=fields[5] == "*")


def _field(text: str, name: str, low: int, high: int) -> frozenset[int]:
    chosen: set[int] = set()
    for part in text.split(","):
        span, _, step_text = part.partition("/")
        try:
            step = int(step_text) if step_text else 1
            if span == "*":
                first, last = low, high
            elif "-" in span:
                a, b = span.split("-", 1)
                first, last = int(a), int(b)
            else:
                first = last = int(span)
                if step_text:
                    last = high
        except ValueError:
            raise ValueError(f"schedule: {name} field {text!r} is not cron syntax") from None
        if step < 1 or not low <= first <= last <= high:
            raise ValueError(f"schedule: {name} field {text!r} is outside {low}-{high}")
        chosen.update(range(first, last + 1, step))
    return frozenset(chosen)
