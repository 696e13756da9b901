"""The UIDs of a folder's first index, made durable before the index is built.

A first SELECT of a big folder written by another program is answered from the directory
listing (as Dovecot answers it from ``dovecot-uidlist``), before the SQLite index exists: the
listing is put in delivery order (UID 1, 2, ... follow it) and written here, then the answer
goes out, then the index is built from the same names under the folder lock
(:mod:`~mailsuite.store.index_build`).  RFC 3501 2.3.1.1: the UIDs and UIDVALIDITY a client
is told must stay the message's; this file is what makes them durable before they are told.

``mailsuite-index.uidlist`` (beside the index, and named like it: whatever removes
``mailsuite-index*`` to make a folder new to us removes it too)::

    mailsuite-uidlist 1 <uidvalidity> <count> <prefix>
    <name of UID 1>
    <name of UID 2>
    ...

Names are "sub/name" as listed (``prefix`` ``-``), or bare ``cur/`` names (``prefix``
``cur/``: a folder with nothing in ``new/``), as :class:`~mailsuite.store.index_build.Ordered`
holds them: the joined listing is written as it is, no string made per message.  Written to a
temporary name, fsynced, renamed into place and the directory fsynced.

The file lives only while the index does not: the build renames the index into place, fsyncs
the directory, then removes it (:func:`remove_uidlist`).  A build killed in between leaves the
uidlist and no index; the next opener (lock held) builds the index from the uidlist's names
with its UIDVALIDITY, and its first sync reconciles them with the directory as it is now
(files moved or renamed keep their UID by their base, removed ones are expunged, new ones
follow).  One killed after the rename and before the removal leaves both: the index wins, and
the next open removes the uidlist (:meth:`~mailsuite.store.index_schema.IndexDatabase._open`).
Left open: an administrator removing only ``mailsuite-index.sqlite`` of such a folder before
anything opened it again would have the next build take the uidlist's UIDVALIDITY, under which
UIDs given after it could be given again; ``mailsuite reindex`` opens the folder first, and
removing ``mailsuite-index*`` removes both.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from mailsuite.store.maildir import fsync_dir

UIDLIST_NAME = "mailsuite-index.uidlist"
#: the temporary name a uidlist is written under (``-<pid>`` follows); a killed writer's is
#: removed by the next build (``index_build.remove_leftovers``)
UIDLIST_TMP = UIDLIST_NAME + ".tmp-"
_MAGIC = "mailsuite-uidlist"
_VERSION = "1"


@dataclass(frozen=True)
class UidList:
    """A uidlist's content: UIDVALIDITY, and the names of UIDs 1, 2, ... (see the module
    docstring for ``prefix``); ``joined`` is ``"\\n".join(names)``."""

    uidvalidity: int
    names: list[str]
    prefix: str
    joined: str


def can_hold(names: list[str], joined: str) -> bool:
    """Can the names be written one a line?  Not when one holds a newline (a name only a
    hostile or broken program makes): then no uidlist, the index is built before answering."""
    return joined.count("\n") == max(len(names) - 1, 0)


def write_uidlist(
    folder: Path, uidvalidity: int, names: list[str], prefix: str, joined: str
) -> None:
    """Write the uidlist of ``folder`` durably (lock held; see the module docstring).  The
    names must pass :func:`can_hold`."""
    head = f"{_MAGIC} {_VERSION} {uidvalidity:d} {len(names):d} {prefix or '-'}\n"
    data = head.encode("ascii") + joined.encode("utf-8", "surrogateescape") + b"\n"
    tmp = folder / f"{UIDLIST_TMP}{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.rename(folder / UIDLIST_NAME)
    fsync_dir(folder)


def read_uidlist(folder: Path) -> UidList | None:
    """The uidlist of ``folder``, or None when there is none or it is not one we wrote (a
    damaged file is no promise: the index is then built under a new UIDVALIDITY, which RFC
    3501 2.3.1.1 allows, and the damaged file is replaced)."""
    try:
        raw = (folder / UIDLIST_NAME).read_bytes()
    except FileNotFoundError:
        return None
    head, sep, body = raw.partition(b"\n")
    parts = head.split(b" ")
    if (
        not sep
        or len(parts) != 5
        or parts[0] != _MAGIC.encode()
        or parts[1] != _VERSION.encode()
        or not parts[2].isdigit()
        or not parts[3].isdigit()
        or parts[4] not in (b"-", b"cur/")
    ):
        return None
    count = int(parts[3])
    if count == 0:
        return UidList(int(parts[2]), [], parts[4].decode() if parts[4] != b"-" else "", "")
    if not body.endswith(b"\n") or body.count(b"\n") != count:
        return None
    joined = body[:-1].decode("utf-8", "surrogateescape")
    names = joined.split("\n")
    prefix = "" if parts[4] == b"-" else "cur/"
    if prefix == "" and any(n[:4] not in ("new/", "cur/") for n in names):
        return None
    return UidList(int(parts[2]), names, prefix, joined)


def remove_uidlist(folder: Path) -> None:
    """Remove the uidlist once the index exists (lock held), durably: a uidlist left beside
    an index that is later removed would hand out its UIDs again."""
    with contextlib.suppress(FileNotFoundError):
        (folder / UIDLIST_NAME).unlink()
        fsync_dir(folder)
