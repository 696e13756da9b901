"""The per-user UIDVALIDITY counter.  Our own code, after Dovecot's ``dovecot-uidvalidity``.

RFC 3501 2.3.1.1: when a mailbox is deleted and a new one is created with the same name, the
new mailbox must get a UIDVALIDITY that its predecessor never had, or clients trust their
cached UIDs and show the old messages for the new ones.  A per-folder value kept in the
folder dies with the folder, and the clock alone repeats itself within a second (DELETE,
CREATE, APPEND three times in a row handed out one value three times: issue 9).  So every
UIDVALIDITY a user's folders get comes from one counter in the user's Maildir++ root: the
next value is the clock or one more than the last value handed out, whichever is greater, so
values only grow for every folder of the user, and a rebuilt index gets a new one too.

The counter is a small file, ``mailsuite-uidvalidity`` (the name the INBOX marker already
had), changed under an exclusive ``flock`` of ``mailsuite-uidvalidity.lock`` so several
processes (two servers, a CLI import, a delivery) never hand out one value twice, and written
durably (temporary file, fsync, rename, fsync of the directory) before the value is used.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable
from pathlib import Path

from mailsuite.store.maildir import fsync_dir

COUNTER_NAME = "mailsuite-uidvalidity"
LOCK_NAME = COUNTER_NAME + ".lock"
_MAX = 0xFFFFFFFF  # RFC 3501 9: nz-number, 32 bits


def account_root(folder: Path) -> Path:
    """The user's Maildir++ root for ``folder``: INBOX is the root itself, every other folder
    is a ``.Name`` directory directly under it."""
    return folder.parent if folder.name.startswith(".") else folder


def _read(path: Path) -> int:
    try:
        text = path.read_text("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return 0
    return int(text) if text.isdigit() else 0


def _write_durably(path: Path, value: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, b"%d\n" % value)
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)
    fsync_dir(path.parent)


def next_uidvalidity(folder: Path, clock: Callable[[], float] | None = None) -> int:
    """A UIDVALIDITY for a new (or rebuilt) index of ``folder``, greater than every value
    handed out before to any folder of the same user.  Blocking (flock, fsync).
    ``clock`` defaults to ``time.time``."""
    root = account_root(folder)
    with (root / LOCK_NAME).open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        last = _read(root / COUNTER_NAME)
        if folder != root:
            # a folder made before the counter existed kept its own marker
            last = max(last, _read(folder / COUNTER_NAME))
        value = max(int((clock or time.time)()), last + 1)
        if value > _MAX:
            raise OverflowError("UIDVALIDITY counter exhausted (more than 2**32 - 1)")
        _write_durably(root / COUNTER_NAME, value)
        return value
