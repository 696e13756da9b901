"""Reading mail to import: an mbox file, or a Maildir / Maildir++ tree.  Our own code: Python's
``mailbox`` module parses every message into an ``email`` object, keeps mboxo's ``>From``
quoting and knows nothing of Dovecot's keywords or UID order; an import wants the raw bytes,
flags and dates, streamed.

mbox (RFC 4155): a message starts at a line beginning ``From `` that follows an empty line (or
starts the file), or at any ``From `` line whose date parses; the empty line before the next
``From `` line belongs to the format, not the message.  Body lines that began with ``From `` were
quoted on writing: mboxrd quotes every ``>*From `` line with one more ``>`` (undone by removing
one ``>`` from every ``>+From `` line), mboxo only ``From `` itself (undone on ``>From `` lines
only).  The internal date is the ``From `` line's date (asctime, taken as UTC), else the Date:
header, else the file's mtime.  Flags come from the ``Status:``/``X-Status:`` headers mutt, Pine
and Thunderbird write, and Thunderbird's ``X-Mozilla-Status``; the message is stored unchanged.

Maildir (and Maildir++, Courier and Dovecot's layout: INBOX at the root, folders as ``.Name``
directories, names in modified UTF-7): files in ``new/`` and ``cur/``, flags from the ``:2,``
info (D F R S T, P as ``$Forwarded``, a-z as keywords named by the folder's
``dovecot-keywords``), the internal date from the file's mtime (what Dovecot and Courier use),
in the order of ``dovecot-uidlist`` where there is one (the UIDs Dovecot gave), else in
delivery order (the time and counter in the unique name).  Dovecot's ``LAYOUT=fs`` trees
(folders as plain subdirectories) are not read.
"""

from __future__ import annotations

import email.utils
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mailsuite.store.index import delivery_order
from mailsuite.store.maildir import LETTER_FLAGS, base_of, read_keywords

MBOX_VARIANTS = ("mboxrd", "mboxo")
_RD_QUOTED = re.compile(rb"^>+From ")
_HEADER_END = re.compile(rb"\n\n")


class SourceError(Exception):
    """The path is not something we can import, worded for the person at the CLI."""


@dataclass(frozen=True)
class SourceMessage:
    """One message to import."""

    folder: str  # the source folder, wire form: "INBOX" or a Maildir++ name ("Sent", "A.B")
    data: bytes  # LF line ends
    flags: frozenset[str]
    internaldate: float
    source_size: int  # bytes of the source this message used (for progress)


@dataclass(frozen=True)
class Source:
    """What an import reads: its kind, its size for progress, its messages in order."""

    path: Path
    kind: str  # "mbox" or "maildir"
    total_bytes: int
    total_messages: int | None  # None for mbox (known only once read)
    mbox_variant: str = "mboxrd"

    def folders(self) -> list[str]:
        """The source's folders (also the empty ones), INBOX first."""
        if self.kind == "mbox":
            return ["INBOX"]
        return [name for name, _ in maildir_folders(self.path)]

    def messages(self) -> Iterator[SourceMessage]:
        if self.kind == "mbox":
            return read_mbox(self.path, self.mbox_variant)
        return read_maildir(self.path)


def open_source(path: Path, mbox_variant: str = "mboxrd") -> Source:
    """Look at ``path``: an mbox file or a Maildir tree (SourceError otherwise)."""
    if mbox_variant not in MBOX_VARIANTS:
        raise SourceError(f"unknown mbox variant {mbox_variant!r} (use mboxrd or mboxo)")
    if path.is_file():
        with path.open("rb") as f:
            head = f.read(4096).lstrip(b"\r\n")
        if head and not head.startswith(b"From "):
            raise SourceError(f"{path} is not an mbox file (it does not start with a From line)")
        return Source(path, "mbox", path.stat().st_size, None, mbox_variant)
    if path.is_dir():
        if not (path / "cur").is_dir() or not (path / "new").is_dir():
            raise SourceError(f"{path} is not a Maildir (no cur/ and new/ in it)")
        count = size = 0
        for _, folder in maildir_folders(path):
            for _, entry in _entries(folder):
                count += 1
                size += entry.stat().st_size
        return Source(path, "maildir", size, count)
    raise SourceError(f"{path} does not exist")


# -- mbox -------------------------------------------------------------------------------------


def from_line_date(line: bytes) -> float | None:
    """The date of an mbox ``From sender date`` line, as seconds since the epoch (UTC)."""
    text = line[5:].decode("ascii", "replace").strip()
    text = text.split(" remote from ", 1)[0]
    _, _, rest = text.partition(" ")
    for candidate in (rest.strip(), text):
        parsed = email.utils.parsedate_tz(candidate) if candidate else None
        if parsed is not None and parsed[0] > 1900:
            return float(email.utils.mktime_tz(parsed))
    return None


def _header_block(data: bytes) -> bytes:
    end = _HEADER_END.search(data)
    return data[: end.start() + 1] if end else data


def _header(block: bytes, name: bytes) -> bytes | None:
    """The first ``name:`` header's value (unfolded) in a header block."""
    m = re.search(rb"(?im)^" + re.escape(name) + rb":[ \t]*(.*(?:\n[ \t].*)*)", block)
    return re.sub(rb"\n[ \t]+", b" ", m.group(1)).strip() if m else None


def mbox_flags(block: bytes) -> frozenset[str]:
    """Flags from the Status/X-Status headers (mutt, Pine, Thunderbird) and
    X-Mozilla-Status (Thunderbird)."""
    flags: set[str] = set()
    status = _header(block, b"Status") or b""
    if b"R" in status:
        flags.add("\\Seen")
    xstatus = _header(block, b"X-Status") or b""
    for letter, flag in ((b"A", "\\Answered"), (b"F", "\\Flagged"), (b"T", "\\Draft")):
        if letter in xstatus:
            flags.add(flag)
    if b"D" in xstatus:
        flags.add("\\Deleted")
    mozilla = _header(block, b"X-Mozilla-Status")
    if mozilla:
        try:
            bits = int(mozilla[:4], 16)
        except ValueError:
            bits = 0
        for bit, flag in ((0x1, "\\Seen"), (0x2, "\\Answered"), (0x4, "\\Flagged")):
            if bits & bit:
                flags.add(flag)
        if bits & 0x1000:
            flags.add("$Forwarded")
    return frozenset(flags)


def _mbox_message(
    lines: list[bytes], from_date: float | None, fallback: float, size: int, variant: str
) -> SourceMessage | None:
    """The message of one mbox entry (None for an entry with nothing in it)."""
    if lines and lines[-1] in (b"\n", b"\r\n"):
        lines.pop()  # the empty line before the next From line is the format's
    out = []
    for line in lines:
        if line.endswith(b"\r\n"):
            line = line[:-2] + b"\n"
        if line.startswith(b">") and (
            (variant == "mboxrd" and _RD_QUOTED.match(line))
            or (variant == "mboxo" and line.startswith(b">From "))
        ):
            line = line[1:]
        out.append(line)
    data = b"".join(out)
    if not data.strip():
        return None
    block = _header_block(data)
    when = from_date
    if when is None:
        date = _header(block, b"Date")
        parsed = email.utils.parsedate_tz(date.decode("ascii", "replace")) if date else None
        when = float(email.utils.mktime_tz(parsed)) if parsed else fallback
    return SourceMessage("INBOX", data, mbox_flags(block), when, size)


def read_mbox(path: Path, variant: str = "mboxrd") -> Iterator[SourceMessage]:
    """The messages of an mbox file, streamed (see the module docstring)."""
    fallback = path.stat().st_mtime
    with path.open("rb") as f:
        lines: list[bytes] = []
        size = 0
        from_date: float | None = None
        started = False
        previous_blank = True
        for line in f:
            if line.startswith(b"From ") and (previous_blank or from_line_date(line) is not None):
                if started and (msg := _mbox_message(lines, from_date, fallback, size, variant)):
                    yield msg
                lines = []
                size = len(line)
                from_date = from_line_date(line)
                started = True
                previous_blank = False
                continue
            previous_blank = line in (b"\n", b"\r\n")
            if not started:
                if previous_blank:
                    continue
                raise SourceError(f"{path} is not an mbox file (text before the first From line)")
            lines.append(line)
            size += len(line)
        if started and (msg := _mbox_message(lines, from_date, fallback, size, variant)):
            yield msg


# -- Maildir ----------------------------------------------------------------------------------


def maildir_folders(root: Path) -> list[tuple[str, Path]]:
    """(name, path) of every folder of a Maildir++ tree, INBOX (the root) first."""
    out = [("INBOX", root)]
    names = []
    with os.scandir(root) as it:
        for entry in it:
            n = entry.name
            if (
                n.startswith(".")
                and n not in (".", "..")
                and len(n) > 1
                and entry.is_dir()
                and (Path(entry.path) / "cur").is_dir()
            ):
                names.append(n[1:])
    out.extend((n, root / f".{n}") for n in sorted(names))
    return out


def _entries(folder: Path) -> Iterator[tuple[str, os.DirEntry[str]]]:
    for sub in ("new", "cur"):
        try:
            with os.scandir(folder / sub) as it:
                for entry in it:
                    if not entry.name.startswith(".") and entry.is_file():
                        yield sub, entry
        except FileNotFoundError:
            continue


def read_uidlist(folder: Path) -> dict[str, int]:
    """base name -> UID from Dovecot's ``dovecot-uidlist`` (versions 1 and 3: ``UID
    [fields] :name`` or ``UID name`` after a header line); empty when there is none."""
    try:
        lines = (folder / "dovecot-uidlist").read_text("utf-8", "replace").splitlines()
    except OSError:
        return {}
    out: dict[str, int] = {}
    for line in lines[1:]:
        head, sep, name = line.partition(" :")
        if not sep:
            parts = line.split()
            if len(parts) < 2:
                continue
            head, name = parts[0], parts[-1]
        uid = head.split(" ", 1)[0]
        if uid.isdigit() and name:
            out[base_of(name)] = int(uid)
    return out


def maildir_flags(sub: str, filename: str, keywords: dict[str, str]) -> frozenset[str]:
    """Flags from a file's ``:2,`` info (``keywords``: letter -> name from
    dovecot-keywords).  Files in ``new/`` have none (they were never seen)."""
    if sub == "new":
        return frozenset()
    _, sep, info = filename.partition(":2,")
    if not sep:
        return frozenset()
    out: set[str] = set()
    for ch in info:
        if ch in LETTER_FLAGS:
            out.add(LETTER_FLAGS[ch])
        elif ch == "P":  # "passed": resent or forwarded
            out.add("$Forwarded")
        elif ch in keywords:
            out.add(keywords[ch])
    return frozenset(out)


def read_maildir_folder(name: str, folder: Path) -> Iterator[SourceMessage]:
    """The messages of one Maildir folder, in Dovecot's UID order or delivery order."""
    uids = read_uidlist(folder)
    keywords = read_keywords(folder)
    entries = list(_entries(folder))
    big = 1 << 62

    def order(item: tuple[str, os.DirEntry[str]]) -> tuple[int, tuple[int, int, int, str]]:
        base = base_of(item[1].name)
        return uids.get(base, big), delivery_order(base)

    entries.sort(key=order)
    for sub, entry in entries:
        try:
            with Path(entry.path).open("rb") as f:
                data = f.read()
            mtime = Path(entry.path).stat().st_mtime
        except FileNotFoundError:
            continue  # removed meanwhile (a live source)
        yield SourceMessage(
            name,
            data.replace(b"\r\n", b"\n"),
            maildir_flags(sub, entry.name, keywords),
            mtime,
            len(data),
        )


def read_maildir(root: Path) -> Iterator[SourceMessage]:
    """Every message of a Maildir++ tree, folder by folder (INBOX first)."""
    for name, folder in maildir_folders(root):
        yield from read_maildir_folder(name, folder)
