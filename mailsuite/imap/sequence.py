"""IMAP sequence sets (RFC 3501 section 9 ``sequence-set``, 6.4.8 ``*`` rules). Our own code.

A parsed set keeps ``*`` symbolic; it is resolved against the largest sequence number or UID
currently in the mailbox, giving sorted, merged, inclusive ranges. Nothing ever materialises a
range as a list of numbers unless a caller asks for one, so ``1:*`` over 100,000 messages is one
tuple, and ``select_sorted`` picks members of a sorted UID list with ``bisect``.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

__all__ = ["STAR", "SequenceSet", "compress", "ranges_contain"]

#: Symbolic ``*`` inside an unresolved range.
STAR = 0
_MAX = 0xFFFFFFFF  # nz-number is a 32-bit unsigned value (RFC 3501 section 9)


def _number(text: str) -> int:
    if text == "*":
        return STAR
    if not text.isdigit() or not text.isascii() or text[0] == "0":
        raise ValueError(f"invalid number {text!r} in sequence set")
    value = int(text)
    if value > _MAX:
        raise ValueError(f"number {text} in sequence set is too large")
    return value


@dataclass(frozen=True, slots=True)
class SequenceSet:
    """A parsed sequence set. ``parts`` holds ``(a, b)`` pairs as written; ``STAR`` (0) is ``*``."""

    parts: tuple[tuple[int, int], ...]

    @classmethod
    def parse(cls, text: str | bytes) -> SequenceSet:
        """Parse ``1:*,5,7:3``; raise ValueError on bad syntax."""
        if isinstance(text, bytes):
            try:
                text = text.decode("ascii")
            except UnicodeDecodeError:
                raise ValueError("sequence set must be ASCII") from None
        if not text:
            raise ValueError("empty sequence set")
        parts: list[tuple[int, int]] = []
        for item in text.split(","):
            a, sep, b = item.partition(":")
            lo = _number(a)
            hi = _number(b) if sep else lo
            parts.append((lo, hi))
        return cls(tuple(parts))

    def resolve(self, largest: int) -> list[tuple[int, int]]:
        """Sorted, merged, inclusive ranges within ``1..largest``.

        ``*`` is ``largest``; ``n:*`` with ``n > largest`` still yields ``largest`` (RFC 3501
        6.4.8), because ranges are unordered (``7:3`` is ``3:7``) and clipped afterwards.
        """
        if largest <= 0:
            return []
        ranges: list[tuple[int, int]] = []
        for a, b in self.parts:
            a = largest if a == STAR else a
            b = largest if b == STAR else b
            if a > b:
                a, b = b, a
            if a > largest:
                continue
            ranges.append((a, min(b, largest)))
        ranges.sort()
        merged: list[tuple[int, int]] = []
        for a, b in ranges:
            if merged and a <= merged[-1][1] + 1:
                if b > merged[-1][1]:
                    merged[-1] = (merged[-1][0], b)
            else:
                merged.append((a, b))
        return merged

    def exceeds(self, largest: int) -> bool:
        """True if a number other than ``*`` is above ``largest``.

        For message sequence numbers that is a client error (the server answers BAD); for UIDs
        it is normal and simply matches nothing.
        """
        return any(max(a, b) > largest for a, b in self.parts)

    def contains(self, n: int, largest: int) -> bool:
        return ranges_contain(self.resolve(largest), n)

    def iter_numbers(self, largest: int) -> Iterator[int]:
        """Every member in ascending order (lazily)."""
        for a, b in self.resolve(largest):
            yield from range(a, b + 1)

    def select_sorted(self, values: Sequence[int], largest: int | None = None) -> list[int]:
        """Members of the ascending list ``values`` (e.g. the mailbox's UIDs) that are in the set.

        ``largest`` defaults to ``values[-1]``, the UID ``*`` means in a UID set.
        """
        if not values:
            return []
        ranges = self.resolve(values[-1] if largest is None else largest)
        out: list[int] = []
        for a, b in ranges:
            i = bisect.bisect_left(values, a)
            j = bisect.bisect_right(values, b, lo=i)
            out.extend(values[i:j])
        return out

    def select_indices(self, values: Sequence[int], largest: int | None = None) -> list[int]:
        """Like ``select_sorted`` but returns 0-based positions (so seq = position + 1)."""
        if not values:
            return []
        ranges = self.resolve(values[-1] if largest is None else largest)
        out: list[int] = []
        for a, b in ranges:
            i = bisect.bisect_left(values, a)
            j = bisect.bisect_right(values, b, lo=i)
            out.extend(range(i, j))
        return out

    def __str__(self) -> str:
        def one(v: int) -> str:
            return "*" if v == STAR else str(v)

        return ",".join(one(a) if a == b else f"{one(a)}:{one(b)}" for a, b in self.parts)


def ranges_contain(ranges: Sequence[tuple[int, int]], n: int) -> bool:
    """Membership test in sorted, merged ranges (as returned by ``SequenceSet.resolve``)."""
    i = bisect.bisect_right(ranges, (n, _MAX + 1)) - 1
    return i >= 0 and ranges[i][0] <= n <= ranges[i][1]


def compress(values: Iterable[int]) -> str:
    """Render numbers compactly: ``[1, 2, 3, 5, 7, 6]`` -> ``1:3,5:7`` (COPYUID, VANISHED...)."""
    nums = sorted(set(values))
    if not nums:
        return ""
    out: list[str] = []
    start = prev = nums[0]
    for v in nums[1:]:
        if v == prev + 1:
            prev = v
            continue
        out.append(str(start) if start == prev else f"{start}:{prev}")
        start = prev = v
    out.append(str(start) if start == prev else f"{start}:{prev}")
    return ",".join(out)
