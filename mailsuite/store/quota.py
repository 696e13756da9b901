"""Storage quotas: a per-user usage counter kept beside the mail, in Maildir++'s own format.

Each user with a limit has a ``maildirsize`` file at the root of the Maildir (the Maildir++
quota file Courier and Dovecot's ``maildir`` quota backend use, so the tree stays readable by
them).  Its first line is the limits (``<bytes>S`` and ``<count>C``: RFC 9208's STORAGE and
MESSAGE resources); every line after it is a change, ``<bytes> <messages>``, appended by
whoever adds or removes mail:

* :func:`charge` is called by the store's one write path (:func:`mailsuite.store.write.place`
  and :meth:`FolderIndex.add_files <mailsuite.store.index.FolderIndex.add_files>`) and by the
  deleting ones (:meth:`FolderIndex.expunge <mailsuite.store.index.FolderIndex.expunge>`, a
  deleted folder): one small ``O_APPEND`` write, no walk of the tree, no fsync (a change lost
  in a crash is a drift that ``mailsuite reindex`` recounts away);
* :func:`usage` sums the file (it stays small: past :data:`COMPACT_AT` bytes the lines are
  folded into one, under an exclusive lock, atomically replaced);
* :func:`recount` walks the tree once and writes a fresh file: when a limit is set
  (``mailsuite user quota``), by ``mailsuite reindex``, and when the file is missing for a
  user who has a limit.

A user without a limit has no file, and nothing is counted for them: that is how "no quota"
costs nothing but a failed ``open``.  Appenders take a shared ``flock`` and check that the file
they hold is still the one at the path (a compaction may have replaced it), so no change is
written into a replaced file.  Sizes are the files' sizes on disk (the ``,S=`` of their names),
as Dovecot's Maildir quota counts them.  Everything here blocks: call it from a thread, except
:class:`UsageCache`, which the SMTP server asks at RCPT (one ``stat`` when nothing changed).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from mailsuite.store.maildir import maildir_folders, unique_name

__all__ = [
    "FILE_NAME",
    "QuotaExceeded",
    "Usage",
    "UsageCache",
    "charge",
    "ensure",
    "folder_usage",
    "format_size",
    "parse_size",
    "recount",
    "remove_limit",
    "root_of",
    "usage",
    "would_exceed",
]

FILE_NAME = "maildirsize"


def _file_of(root: Path) -> str:
    """``root``'s quota file as a string: asked at every RCPT and every delivery, where a
    path object per question was a measurable part of the cost; callers ask ``os.access``
    first, which says "no file" (no limit, the usual case) without an exception."""
    return f"{os.fspath(root)}/{FILE_NAME}"


#: Past this size the change lines are folded into one (Maildir++ recalculates at 5120 bytes by
#: walking the tree; folding is cheap, and a short file is read faster at every check).
COMPACT_AT = 1024
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)
_S_RE = re.compile(r",S=(\d+)")


class QuotaExceeded(Exception):
    """Storing this would take the user over their limit (RFC 9208 OVERQUOTA, RFC 3463
    X.2.2 "mailbox full")."""


@dataclass(frozen=True)
class Usage:
    """What the quota file says: the limits (bytes, messages; 0 = none) and what is stored."""

    limit: int
    bytes: int
    messages: int
    max_messages: int = 0

    @property
    def over(self) -> bool:
        """At or past a limit: nothing more may be stored."""
        return (self.limit > 0 and self.bytes >= self.limit) or (
            self.max_messages > 0 and self.messages >= self.max_messages
        )

    def fits(self, adding: int, count: int = 1) -> bool:
        """Whether ``count`` more messages of ``adding`` bytes in all stay within the limits."""
        return (self.limit <= 0 or self.bytes + adding <= self.limit) and (
            self.max_messages <= 0 or self.messages + count <= self.max_messages
        )


def parse_size(text: str) -> int:
    """``"20K"`` -> 20480, ``"1G"``, ``"512M"``, ``"0"`` (none); binary units, an optional
    ``B``/``iB``.  ValueError with a message a person can act on."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a size (write e.g. 500M, 2G, 20K or 0 for none)")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def format_size(n: int) -> str:
    """The largest binary unit that divides ``n`` exactly (``1073741824`` -> ``"1G"``)."""
    if n <= 0:
        return "0"
    for unit in ("T", "G", "M", "K"):
        if n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit}"
    return str(n)


def root_of(folder: Path) -> Path:
    """The user's Maildir root for one of its folders (INBOX is the root, ``.Name`` beside)."""
    return folder.parent if folder.name.startswith(".") else folder


def _parse(data: bytes) -> Usage:
    head, _, rest = data.partition(b"\n")
    limit = max_messages = 0
    for part in head.decode("ascii", "replace").split(","):
        part = part.strip()
        if part.endswith("S") and part[:-1].isdigit():
            limit = int(part[:-1])
        elif part.endswith("C") and part[:-1].isdigit():
            max_messages = int(part[:-1])
    rest = rest[: rest.rfind(b"\n") + 1]  # an interrupted last append is skipped
    fields = rest.split()
    try:
        if len(fields) == 2 * rest.count(b"\n"):  # the usual case: every line "bytes count"
            total, count = sum(map(int, fields[0::2])), sum(map(int, fields[1::2]))
            return Usage(limit, max(total, 0), max(count, 0), max_messages)
    except ValueError:
        pass
    total = count = 0
    for line in rest.split(b"\n"):  # a damaged line is skipped, as Maildir++ readers do
        pair = line.split()
        if len(pair) == 2:
            try:
                b, n = int(pair[0]), int(pair[1])
            except ValueError:
                continue
            total += b
            count += n
    return Usage(limit, max(total, 0), max(count, 0), max_messages)


def usage(root: Path) -> Usage | None:
    """The user's limit and usage, None when the user has no quota file (no limit).

    Asked for every delivered message (see :func:`_file_of`)."""
    path = _file_of(root)
    if not os.access(path, os.F_OK):
        return None
    try:
        with open(path, "rb") as f:  # noqa: PTH123 (see above)
            return _parse(f.read())
    except FileNotFoundError:  # removed in between
        return None


def would_exceed(root: Path, adding: int, count: int = 1) -> bool:
    """Whether storing ``count`` more messages of ``adding`` bytes in all takes the user at
    ``root`` over a limit."""
    u = usage(root)
    return u is not None and not u.fits(adding, count)


def charge(folder: Path, size: int, messages: int) -> None:
    """Record ``size`` bytes and ``messages`` messages added (negative: removed) in
    ``folder``'s user; nothing when the user has no limit.  Never raises for a quota file
    problem: the mail operation it follows has happened, and a recount repairs the count."""
    if not size and not messages:
        return
    path = _file_of(root_of(folder))
    if not os.access(path, os.F_OK):
        return  # no file: no limit, nothing to count (said without an exception)
    line = f"{size} {messages}\n".encode()
    for _ in range(5):  # a replaced file (compaction) is reopened
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        except OSError:
            return  # no file: no limit, nothing to count
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            try:
                if os.fstat(fd).st_ino != os.stat(path).st_ino:  # noqa: PTH116
                    continue
            except FileNotFoundError:
                return  # the limit was removed meanwhile
            os.write(fd, line)
            big = os.fstat(fd).st_size > COMPACT_AT
        except OSError:
            return
        finally:
            os.close(fd)
        if big:
            _compact(Path(path))
        return


def _compact(path: Path) -> None:
    """Fold the change lines into one (the file is replaced, under an exclusive lock)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.fstat(fd).st_ino != path.stat().st_ino:
                return  # another process compacted it first
        except FileNotFoundError:
            return
        data = b""
        while chunk := os.read(fd, 65536):
            data += chunk
        u = _parse(data)
        if os.fstat(fd).st_size <= COMPACT_AT:
            return
        _write(path, u)
    except OSError:
        return
    finally:
        os.close(fd)


def _write(path: Path, u: Usage) -> None:
    """Replace the quota file atomically with one holding ``u``."""
    tmp = path.with_name(f".{FILE_NAME}.{unique_name()}")
    with tmp.open("wb") as f:
        head = f"{u.limit}S" + (f",{u.max_messages}C" if u.max_messages else "")
        f.write(f"{head}\n{u.bytes} {u.messages}\n".encode())
    tmp.chmod(0o600)
    if os.geteuid() == 0:  # a root CLI (import, reindex) keeps the server's ownership
        try:
            st = path.stat()
            os.chown(tmp, st.st_uid, st.st_gid)
        except FileNotFoundError:
            pass
    tmp.replace(path)


def folder_usage(folder: Path) -> tuple[int, int]:
    """(bytes, messages) of one folder's ``cur/`` and ``new/``, from the sizes in the names
    (``,S=``), ``stat`` for a name without one."""
    total = count = 0
    for sub in ("cur", "new"):
        try:
            it = os.scandir(folder / sub)
        except (FileNotFoundError, NotADirectoryError):
            continue
        with it:
            for entry in it:
                if entry.name.startswith("."):
                    continue
                m = _S_RE.search(entry.name)
                if m:
                    size = int(m.group(1))
                else:
                    try:
                        size = entry.stat(follow_symlinks=False).st_size
                    except FileNotFoundError:
                        continue
                total += size
                count += 1
    return total, count


def recount(root: Path, limit: int, max_messages: int = 0) -> Usage:
    """Walk the user's folders once and write a fresh quota file with ``limit`` (bytes) and
    ``max_messages`` (0: none).
    Deliveries running meanwhile may be counted twice or not at all: Maildir++ accepts that
    drift, and the next recount fixes it."""
    total = count = 0
    for folder in maildir_folders(root):
        b, n = folder_usage(folder)
        total += b
        count += n
    u = Usage(limit, total, count, max_messages)
    if root.is_dir():
        _write(root / FILE_NAME, u)
    return u


def remove_limit(root: Path) -> None:
    """The user has no limit any more: drop the file (nothing is counted from now on)."""
    with contextlib.suppress(FileNotFoundError):
        (root / FILE_NAME).unlink()


def ensure(root: Path, limit: int, max_messages: int = 0) -> Usage | None:
    """Make the quota file agree with the limits (0: none): recount when the file is missing
    or names other limits, remove it when there is none.  Returns the usage, None without a
    limit."""
    if limit <= 0 and max_messages <= 0:
        remove_limit(root)
        return None
    u = usage(root)
    if u is None or u.limit != limit or u.max_messages != max_messages:
        return recount(root, limit, max_messages)
    return u


class UsageCache:
    """Whether a user is over their limit, for the reactor thread (SMTP RCPT): the quota file
    is read again only when its (inode, size, mtime) changed -- one ``stat`` per question
    otherwise, none of it for a user without a file beyond that ``stat``."""

    MAX_ENTRIES = 10_000

    def __init__(self) -> None:
        self._seen: dict[str, tuple[tuple[int, int, int], Usage]] = {}

    def get(self, root: Path) -> Usage | None:
        path = _file_of(root)  # (asked at every RCPT)
        try:
            st = os.stat(path) if os.access(path, os.F_OK) else None  # noqa: PTH116
        except OSError:
            st = None
        if st is None:
            self._seen.pop(path, None)
            return None
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        hit = self._seen.get(path)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        try:
            with open(path, "rb") as f:  # noqa: PTH123
                u = _parse(f.read())
        except OSError:
            return None
        if len(self._seen) >= self.MAX_ENTRIES:
            self._seen.pop(next(iter(self._seen)))
        self._seen[path] = (stamp, u)
        return u

    def over(self, roots: Iterable[Path]) -> bool:
        """Every one of ``roots`` is at or past its limit (and there is at least one)."""
        any_root = False
        for root in roots:
            any_root = True
            u = self.get(root)
            if u is None or not u.over:
                return False
        return any_root
