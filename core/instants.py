"""Instants: µs since the Unix epoch (UTC), and the text forms they travel in.

- `parse_stamp` reads a `field_meta` stamp (domain.md §2, Decision: compare instants, not
  text). A stamp is an RFC 3339 date-time with an explicit offset: `YYYY-MM-DD` `T` (or one
  space) `HH:MM:SS`, optionally `.` and 1 to 9 fraction digits (digits beyond the
  microsecond are truncated), then `Z` or `±HH`, `±HHMM`, `±HH:MM`. Rejected: naive
  date-times (JS reads them in the writer's local zone, which we cannot know), date-only
  text, lower-case `t`/`z`, leap seconds, out-of-range fields, and anything that is not a
  string or an object with a string `at`. JS `toISOString()` output (`…00.000Z`) parses.
- `format_stamp` writes an instant exactly (milliseconds when it has no finer part, else
  microseconds): for our own tables, where a stamp must read back as the same instant.
- `iso_ms` writes what leaves the service for the web app and people: JS `toISOString()`
  form, exactly three fraction digits and `Z`, so that stamps the web app compares as
  strings order as their instants do.
- `us_to_datetime` / `datetime_to_us` at the database edge.

Pure: no clock reads.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Final

EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_US: Final = timedelta(microseconds=1)

MAX_STAMP_LEN: Final = 38
"""Longer text is never a stamp (the longest the grammar accepts is 35 characters)."""

_STAMP_TEXT: Final = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9]{2}:[0-9]{2}:[0-9]{2}"
    r"(?:\.[0-9]{1,9})?(?:Z|[+-](?:[01][0-9]|2[0-3])(?::?[0-5][0-9])?)"
)


@lru_cache(maxsize=4096)
def parse_stamp_text(text: str) -> int | None:
    """The instant of stamp text (at most `MAX_STAMP_LEN` characters), or None."""
    # The regex fixes the grammar (offsets bounded to ±23:59); datetime.fromisoformat (C,
    # ~0.1 µs) checks the calendar and clock fields, does the arithmetic, and truncates
    # fractions beyond 6 digits.
    if _STAMP_TEXT.fullmatch(text) is None:
        return None
    try:
        return (datetime.fromisoformat(text) - EPOCH) // _ONE_US
    except ValueError:  # month 13, Feb 30, hour 24, second 60, year 0
        return None


def parse_stamp(value: object) -> int | None:
    """The instant of a `field_meta` entry in µs since the epoch, or None if it has none.

    `value` is a legacy ISO string or an object whose `at` is one; see the module docstring
    for the accepted text. `…00Z`, `…00.000Z` and `…02:00:00+02:00` are the same instant.
    """
    if isinstance(value, str):
        text = value
    elif isinstance(value, dict):
        at = value.get("at")
        if not isinstance(at, str):
            return None
        text = at
    else:
        return None
    if len(text) > MAX_STAMP_LEN:  # also keeps huge junk out of the cache
        return None
    return parse_stamp_text(text)


def _civil_from_days(days: int) -> tuple[int, int, int]:
    # H. Hinnant's days -> (year, month, day), proleptic Gregorian, valid for every int.
    z = days + 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    return yoe + era * 400 + (month <= 2), month, day


def _format(us: int, *, exact: bool) -> str:
    seconds, fraction = divmod(us, 1_000_000)
    days, second_of_day = divmod(seconds, 86400)
    year, month, day = _civil_from_days(days)
    hour, rest = divmod(second_of_day, 3600)
    minute, second = divmod(rest, 60)
    year_text = f"{year:04d}" if 0 <= year <= 9999 else f"{year:+07d}"
    if exact and fraction % 1000:
        frac_text = f"{fraction:06d}"
    else:
        frac_text = f"{fraction // 1000:03d}"
    return f"{year_text}-{month:02d}-{day:02d}T{hour:02d}:{minute:02d}:{second:02d}.{frac_text}Z"


@lru_cache(maxsize=4096)
def format_stamp(us: int) -> str:
    """ISO-8601 UTC text with `Z` that reads back as exactly `us`: milliseconds when the
    instant has no sub-millisecond part, else microseconds; years outside 0..9999 as
    `±YYYYYY`. For our own tables (the snapshots' `__fieldMeta`), not for the web app."""
    return _format(us, exact=True)


def iso_ms(us: int) -> str:
    """JS `toISOString()` form: exactly three fraction digits (the instant truncated to the
    millisecond, as a JS Date holds it) and `Z`. Every timestamp that leaves the service
    (rows appended to `sync_changes`, the status API) is written this way: the web app
    orders some stamps as strings, where `…00.409Z` would sort after `…00.409497Z`."""
    return _format(us, exact=False)


def us_to_datetime(us: int) -> datetime:
    return EPOCH + timedelta(microseconds=us)


def datetime_to_us(dt: datetime) -> int:
    return (dt - EPOCH) // _ONE_US
