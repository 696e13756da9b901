"""Maildir++ on disk: folder paths, unique names, flags in names.

Replaces twisted.mail.maildir, which fails on Python 3 and never fsyncs (see README).
Layout follows Maildir++ so mutt, Dovecot or getmail can read the same tree: INBOX is the
user's root folder, other folders are ``.Name`` (hierarchy separator ``.`` on disk, names in
modified UTF-7), flags in the ``:2,`` suffix, files stored with LF line ends.  Keywords are
stored as the letters ``a``-``z`` in the info suffix, mapped to names by the folder's
``dovecot-keywords`` file, exactly as Dovecot does, so keywords survive an index rebuild and
Dovecot reads them.

Writing a message into a folder (``tmp/``, fsync, rename, fsync the directory) is
:mod:`mailsuite.store.write`'s job.
"""

from __future__ import annotations

import itertools
import os
import socket
import stat
import time
from collections.abc import Mapping
from pathlib import Path

from mailsuite.procid import pid

SUBDIRS = ("cur", "new", "tmp")

#: IMAP system flag <-> Maildir info letter (the letters must stay sorted in names).
FLAG_LETTERS = {
    "\\Draft": "D",
    "\\Flagged": "F",
    "\\Answered": "R",
    "\\Seen": "S",
    "\\Deleted": "T",
}
LETTER_FLAGS = {v: k for k, v in FLAG_LETTERS.items()}
KEYWORDS_FILE = "dovecot-keywords"
KEYWORD_LETTERS = "abcdefghijklmnopqrstuvwxyz"

_counter = itertools.count()
_HOST = socket.gethostname().replace("/", "\\057").replace(":", "\\072") or "localhost"


class FolderNameError(ValueError):
    """A mailbox name that would leave the user's directory or is not representable."""


def unique_name() -> str:
    """A Maildir unique name: ``time.M<usec>P<pid>Q<n>.host`` (the pid of the process at
    call time, from :func:`mailsuite.procid.pid`)."""
    now = time.time()
    sec = int(now)
    usec = int((now - sec) * 1_000_000)
    return f"{sec}.M{usec}P{pid()}Q{next(_counter)}.{_HOST}"


def base_of(filename: str) -> str:
    """The unique part of a Maildir file name (what stays when flags change)."""
    return filename.split(":", 1)[0]


def info_for(
    flags: set[str] | frozenset[str], keyword_letters: Mapping[str, str] | None = None
) -> str:
    """The ``:2,`` suffix for a set of flags (letters in ASCII order); keywords are written
    only when ``keyword_letters`` (keyword -> letter) gives them a letter."""
    letters = [FLAG_LETTERS[f] for f in flags if f in FLAG_LETTERS]
    if keyword_letters:
        letters.extend(keyword_letters[f] for f in flags if f in keyword_letters)
    return ":2," + "".join(sorted(letters))


def read_keywords(folder: Path) -> dict[str, str]:
    """``dovecot-keywords``: letter -> keyword name (``0 $Label1`` lines, 0 = ``a``)."""
    out: dict[str, str] = {}
    try:
        text = (folder / KEYWORDS_FILE).read_text("utf-8", "replace")
    except OSError:
        return out
    for line in text.splitlines():
        num, _, name = line.partition(" ")
        if num.isdigit() and int(num) < len(KEYWORD_LETTERS) and name:
            out[KEYWORD_LETTERS[int(num)]] = name
    return out


def write_keywords(folder: Path, letters: Mapping[str, str]) -> None:
    """Replace ``dovecot-keywords`` atomically (caller holds the folder lock)."""
    lines = [f"{KEYWORD_LETTERS.index(ch)} {name}\n" for ch, name in sorted(letters.items())]
    tmp = folder / (KEYWORDS_FILE + ".tmp")
    tmp.write_text("".join(lines), "utf-8")
    tmp.replace(folder / KEYWORDS_FILE)


def ensure_folder(path: Path) -> Path:
    """Create ``cur/new/tmp`` under ``path`` if missing (mode 0700) and return ``path``."""
    for sub in SUBDIRS:
        (path / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def fsync_dir(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def folder_path(user_root: Path, name: str) -> Path:
    """Map an IMAP mailbox name (already decoded, hierarchy ``/`` or ``.``) to its directory.

    INBOX (any case) is the root.  Other names become one ``.A.B`` directory directly under
    the root.  Anything that could escape the root or collide with Maildir internals is
    refused: empty levels, ``.``/``..`` levels, ``/`` inside a level, ``~``, NUL, control
    characters.
    """
    if name.upper() == "INBOX":
        return user_root
    if not name or len(name) > 512:
        raise FolderNameError("mailbox name is empty or too long")
    levels = name.split("/") if "/" in name else name.split(".")
    for level in levels:
        if level in ("", ".", ".."):
            raise FolderNameError("mailbox name has an empty or relative level")
        if level.startswith("~") or any(ord(c) < 0x20 or c == "\x7f" for c in level):
            raise FolderNameError("mailbox name has a forbidden character")
        if "\\" in level:
            raise FolderNameError("mailbox name has a forbidden character")
    if levels[0].upper() == "INBOX" and len(levels) > 1:
        levels[0] = "INBOX"
    path = user_root / ("." + ".".join(levels))
    if path.parent != user_root:
        raise FolderNameError("mailbox name escapes the mailbox root")
    return path


def maildir_folders(root: Path) -> list[Path]:
    """Every folder of a Maildir++ tree that has a ``tmp/``: the root (INBOX) and each
    ``.Name`` directory beside it.  A missing root has none.  Blocking."""
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return []
    out = [root] if (root / "tmp").is_dir() else []
    for entry in entries:
        if (
            entry.name.startswith(".")
            and entry.name not in (".", "..")
            and entry.is_dir(follow_symlinks=False)
            and Path(entry.path, "tmp").is_dir()
        ):
            out.append(Path(entry.path))
    return out


def remove_stale(directory: Path, cutoff: float) -> list[Path]:
    """Remove the regular files in ``directory`` neither modified nor read since ``cutoff``
    (a time stamp) and return them.  For ``tmp/`` folders, where an interrupted write leaves
    its file (maildir(5): "delete any file in tmp that has not been accessed in 36 hours").
    A missing directory has nothing to remove.  Blocking."""
    removed: list[Path] = []
    try:
        it = os.scandir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return removed
    with it:
        for entry in it:
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed meanwhile (renamed into new/ by its writer)
            if not stat.S_ISREG(st.st_mode) or max(st.st_mtime, st.st_atime) >= cutoff:
                continue
            try:
                Path(entry.path).unlink()
            except FileNotFoundError:
                continue
            removed.append(Path(entry.path))
    return removed
