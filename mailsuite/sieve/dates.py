"""Date parts for the ``date`` and ``currentdate`` tests (RFC 5260 4, 5)."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from email.utils import format_datetime, parsedate_tz

_MJD_EPOCH = date(1858, 11, 17)  # RFC 5260 4.2 "julian": the Modified Julian Day


def parse_zone(zone: str) -> timezone:
    """``+hhmm``/``-hhmm`` (checked by the validator when constant; here for variables)."""
    if len(zone) != 5 or zone[0] not in "+-" or not zone[1:].isdigit():
        raise ValueError(f"bad zone {zone!r}")
    minutes = int(zone[1:3]) * 60 + int(zone[3:5])
    if int(zone[1:3]) > 23 or int(zone[3:5]) > 59:
        raise ValueError(f"bad zone {zone!r}")
    return timezone(timedelta(minutes=minutes if zone[0] == "+" else -minutes))


def header_datetime(value: str) -> datetime | None:
    """A date-time from a header value (RFC 5322 3.3); for ``Received`` the date follows the
    last ``;`` (RFC 5260 4.1).  None when there is none."""
    for candidate in (value, value.rpartition(";")[2]):
        parsed = parsedate_tz(candidate.strip())
        if parsed is None:
            continue
        offset = parsed[9] or 0
        try:
            return datetime(*parsed[:6], tzinfo=timezone(timedelta(seconds=offset)))
        except (ValueError, OverflowError):
            return None
    return None


def _zone(dt: datetime) -> str:
    off = dt.utcoffset() or timedelta(0)
    minutes = int(off.total_seconds()) // 60
    sign = "+" if minutes >= 0 else "-"
    minutes = abs(minutes)
    return f"{sign}{minutes // 60:02d}{minutes % 60:02d}"


def date_part(dt: datetime, part: str) -> str:
    """RFC 5260 4.2: the text of one part of ``dt`` (already in the wanted zone)."""
    if part == "year":
        return f"{dt.year:04d}"
    if part == "month":
        return f"{dt.month:02d}"
    if part == "day":
        return f"{dt.day:02d}"
    if part == "date":
        return f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}"
    if part == "julian":
        return str((dt.date() - _MJD_EPOCH).days)
    if part == "hour":
        return f"{dt.hour:02d}"
    if part == "minute":
        return f"{dt.minute:02d}"
    if part == "second":
        return f"{dt.second:02d}"
    if part == "time":
        return f"{dt.hour:02d}:{dt.minute:02d}:{dt.second:02d}"
    if part == "iso8601":
        z = _zone(dt)
        return (
            f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}T{dt.hour:02d}:{dt.minute:02d}:"
            f"{dt.second:02d}{z[:3]}:{z[3:]}"
        )
    if part == "std11":
        return format_datetime(dt)
    if part == "zone":
        return _zone(dt)
    if part == "weekday":
        return str((dt.weekday() + 1) % 7)  # 0 = Sunday
    raise ValueError(f"unknown date part {part!r}")
