"""A maildrop held in memory for the POP3 session tests: what the session asks of the store
(numbers, sizes, UIDLs, reading, marking), with the calls it made left to look at."""

from __future__ import annotations

import io
from dataclasses import dataclass, field

from mailsuite.pop3.maildrop import MessageGone


def crlf(data: bytes) -> bytes:
    """``data`` with CRLF line ends and a final line end, as POP3 sends a message."""
    data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return data if not data or data.endswith(b"\r\n") else data + b"\r\n"


@dataclass
class Msg:
    uid: int
    size: int
    flags: frozenset[str] = frozenset()


@dataclass
class FakeMaildrop:
    bodies: list[bytes]
    deleted: set[int] = field(default_factory=set)
    retrieved: set[int] = field(default_factory=set)
    seen: set[int] = field(default_factory=set)
    gone: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.messages = [Msg(10 + i, len(crlf(b))) for i, b in enumerate(self.bodies)]

    def __len__(self) -> int:
        return len(self.messages)

    def valid(self, n: int) -> bool:
        return 1 <= n <= len(self.messages) and n not in self.deleted

    def message(self, n: int) -> Msg:
        return self.messages[n - 1]

    def stat(self) -> tuple[int, int]:
        live = self.live()
        return len(live), sum(self.messages[n - 1].size for n in live)

    def live(self) -> list[int]:
        return [n for n in range(1, len(self.messages) + 1) if n not in self.deleted]

    def uidl(self, n: int) -> str:
        return f"abc.{self.message(n).uid:x}"

    def uidl_listing(self) -> str:
        return "".join(f"{n} {self.uidl(n)}\r\n" for n in self.live())

    def read(self, n: int) -> bytes:
        if n in self.gone:
            raise MessageGone(n)
        return self.bodies[n - 1]

    def open_file(self, n: int) -> io.BytesIO:
        return io.BytesIO(self.read(n))

    def read_top(self, n: int, lines: int) -> bytes:
        head, _, body = self.read(n).partition(b"\n\n")
        return head + b"\n\n" + b"".join(x + b"\n" for x in body.split(b"\n")[:lines] if x)

    def open_top(self, n: int, lines: int) -> io.BytesIO:
        return io.BytesIO(self.read_top(n, lines))

    def mark_seen(self, n: int) -> None:
        self.seen.add(n)

    def note_retrieved(self, n: int) -> None:
        self.retrieved.add(n)
