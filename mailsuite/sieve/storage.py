"""A user's Sieve scripts on disk, in Dovecot/Pigeonhole's layout so either can read them.

Under the user's mail folder (the Maildir root)::

    sieve/NAME.sieve      one file per script (UTF-8 text)
    .dovecot.sieve        symlink to sieve/NAME.sieve: the active script (absent: none)
    sieve/sieve.log       run-time failures, for the user (``mailsuite sieve log``)
    sieve/vacation.json   whom vacation answered, until when (see :mod:`.vacation`)

``.dovecot.sieve`` is a link to a file, never a directory, so the store does not list it as a
folder.  Every change is atomic: a script is written to a temporary file, fsynced and renamed
over the old one; the active link is made under a temporary name and renamed over the old
link; the folder is fsynced after each rename.  Names are checked (RFC 5804 1.6 plus no
``/`` and no leading dot) before they become file names, so no name leaves ``sieve/``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import stat
import uuid
from datetime import UTC, datetime
from pathlib import Path

from mailsuite.sieve.validate import valid_script_name
from mailsuite.store.maildir import fsync_dir

SIEVE_DIR = "sieve"
ACTIVE_LINK = ".dovecot.sieve"
SUFFIX = ".sieve"
LOG_FILE = "sieve.log"
VACATION_FILE = "vacation.json"
#: The log is cut back to its newest half when it passes this size.
MAX_LOG = 256 * 1024


class ScriptError(Exception):
    """A refused script operation; ``code`` is a ManageSieve response code (RFC 5804 1.3)
    such as ``NONEXISTENT``, ``ACTIVE``, ``ALREADYEXISTS``, ``QUOTA/MAXSCRIPTS``."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class ScriptStore:
    """One user's scripts (blocking file-system calls: run them in a thread from Twisted)."""

    def __init__(self, root: Path, max_scripts: int = 100, max_size: int = 1024 * 1024) -> None:
        self.root = root
        self.max_scripts = max_scripts
        self.max_size = max_size

    # (made when first used: delivery makes a store for every run of a script, and most
    # runs need neither path)

    @functools.cached_property
    def dir(self) -> Path:
        return self.root / SIEVE_DIR

    @functools.cached_property
    def link(self) -> Path:
        return self.root / ACTIVE_LINK

    # -- names --------------------------------------------------------------------------------

    def path(self, name: str) -> Path:
        if not valid_script_name(name):
            raise ScriptError(f"{name!r} is not a valid script name")
        return self.dir / (name + SUFFIX)

    def names(self) -> list[str]:
        try:
            entries = [entry.name for entry in self.dir.iterdir()]
        except FileNotFoundError:
            return []
        out = []
        for entry in entries:
            if entry.endswith(SUFFIX) and not entry.startswith("."):
                name = entry[: -len(SUFFIX)]
                if valid_script_name(name) and (self.dir / entry).is_file():
                    out.append(name)
        return sorted(out)

    def exists(self, name: str) -> bool:
        try:
            return self.path(name).is_file()
        except ScriptError:
            return False

    def read(self, name: str) -> str:
        try:
            return self.path(name).read_bytes().decode("utf-8", "replace")
        except FileNotFoundError:
            raise ScriptError(f"there is no script named {name!r}", "NONEXISTENT") from None

    # -- the active script -------------------------------------------------------------------

    def active(self) -> str | None:
        """The active script's name, or None (no link, or a link that points elsewhere)."""
        try:
            # the link's text as written (Path.readlink would normalise it)
            target = os.readlink(self.link)  # noqa: PTH115
        except OSError:
            return None
        head, _, tail = target.rpartition("/")
        if head not in (SIEVE_DIR, str(self.dir)) or not tail.endswith(SUFFIX):
            return None
        name = tail[: -len(SUFFIX)]
        return name if valid_script_name(name) and self.exists(name) else None

    def active_path(self) -> Path | None:
        """The file delivery runs: the linked script, or a plain ``.dovecot.sieve`` file (as
        Pigeonhole allows).  One ``lstat`` when there is none (the common case)."""
        try:
            st = os.lstat(self.link)
        except OSError:
            return None
        if not stat.S_ISLNK(st.st_mode):
            return self.link if stat.S_ISREG(st.st_mode) else None
        name = self.active()
        return self.path(name) if name is not None else None

    def activate(self, name: str | None) -> None:
        """Make ``name`` the active script; None deactivates (RFC 5804 2.8: SETACTIVE "")."""
        if name is None:
            try:
                self.link.unlink()
            except FileNotFoundError:
                return
            fsync_dir(self.root)
            return
        if not self.exists(name):
            raise ScriptError(f"there is no script named {name!r}", "NONEXISTENT")
        tmp = self.root / f"{ACTIVE_LINK}.{uuid.uuid4().hex}.tmp"
        tmp.symlink_to(f"{SIEVE_DIR}/{name}{SUFFIX}")
        try:
            tmp.replace(self.link)
        except BaseException:
            _unlink(tmp)
            raise
        fsync_dir(self.root)

    # -- changes ------------------------------------------------------------------------------

    def check_space(self, name: str, size: int) -> None:
        """RFC 5804 2.5 HAVESPACE: raise :class:`ScriptError` with a QUOTA code if storing
        ``size`` bytes as ``name`` would pass a limit."""
        self.path(name)
        if size > self.max_size:
            raise ScriptError(
                f"script is larger than the limit of {self.max_size} bytes", "QUOTA/MAXSIZE"
            )
        if not self.exists(name) and len(self.names()) >= self.max_scripts:
            raise ScriptError(
                f"no room for more than {self.max_scripts} scripts", "QUOTA/MAXSCRIPTS"
            )

    def put(self, name: str, text: str) -> None:
        """Store ``text`` (already checked by the caller) as ``name``, atomically."""
        data = text.encode("utf-8")
        self.check_space(name, len(data))
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        _write_atomic(self.path(name), data)

    def delete(self, name: str) -> None:
        """RFC 5804 2.10: the active script cannot be deleted."""
        path = self.path(name)
        if self.active() == name:
            raise ScriptError("the active script cannot be deleted", "ACTIVE")
        try:
            path.unlink()
        except FileNotFoundError:
            raise ScriptError(f"there is no script named {name!r}", "NONEXISTENT") from None
        fsync_dir(self.dir)

    def rename(self, old: str, new: str) -> None:
        """RFC 5804 2.11.1: the active script stays active under its new name."""
        src, dst = self.path(old), self.path(new)
        if not src.is_file():
            raise ScriptError(f"there is no script named {old!r}", "NONEXISTENT")
        if dst.exists():
            raise ScriptError(f"a script named {new!r} exists already", "ALREADYEXISTS")
        was_active = self.active() == old
        os.link(src, dst)  # fails if new appeared meanwhile: never overwrites
        if was_active:
            fsync_dir(self.dir)
            self.activate(new)
        src.unlink()
        fsync_dir(self.dir)

    # -- the user's log ------------------------------------------------------------------------

    def append_log(self, text: str, now: datetime | None = None) -> None:
        """One line in ``sieve/sieve.log``; the log is bounded (cut to its newest half)."""
        when = (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
        line = f"{when} {' '.join(text.split())}\n".encode("utf-8", "replace")
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.dir / LOG_FILE
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, line)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        if size > MAX_LOG:
            data = path.read_bytes()
            cut = data.find(b"\n", len(data) - MAX_LOG // 2)
            _write_atomic(path, data[cut + 1 :] if cut >= 0 else b"")

    def read_log(self) -> str:
        try:
            return (self.dir / LOG_FILE).read_text("utf-8", "replace")
        except FileNotFoundError:
            return ""

    @property
    def vacation_path(self) -> Path:
        return self.dir / VACATION_FILE


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink(tmp)
        raise
    os.close(fd)
    try:
        tmp.replace(path)
    except BaseException:
        _unlink(tmp)
        raise
    fsync_dir(path.parent)


def _unlink(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()
