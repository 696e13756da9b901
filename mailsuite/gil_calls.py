"""Short system calls made without letting go of the GIL: ``close``, ``access``, the ``open``
of a directory.

CPython lets go of the GIL around every system call.  A delivery's file work runs in the disk
threads (:mod:`mailsuite.disk_jobs`) while the reactor thread runs Python, so each such call of
a disk thread is a hand-over: another thread takes the GIL, and the disk thread, its call done
in a microsecond, waits to get it back (a futex wait, a wake-up, two context switches).
``strace -f`` of a server (workers = 1) under smtp-source, 20 sessions, 4 KiB messages over
new connections: 76 futex calls per message in the disk threads for their 13 other system
calls, nearly all on the GIL's mutex and conditions; ``perf`` put a quarter of the process's
CPU in futex waits and wake-ups.  ``close`` of a file already fsynced, the existence of a
file in a directory in use (the quota file, the active Sieve script: usually none) and the
``open`` of a directory to fsync it (``new/``) answer from memory, so they are called here
through
:class:`ctypes.PyDLL`, which keeps the GIL; the calls that wait for the disk or for a
directory's lock (open, write, fsync, rename) let go of it as before.
"""

from __future__ import annotations

import ctypes
import os

__all__ = ["close", "exists", "lexists", "open_dir"]

_libc = ctypes.PyDLL(None, use_errno=True)
_close = _libc.close
_close.argtypes = [ctypes.c_int]
_close.restype = ctypes.c_int
_access = _libc.access
_access.argtypes = [ctypes.c_char_p, ctypes.c_int]
_access.restype = ctypes.c_int
_faccessat = _libc.faccessat
_faccessat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_int]
_faccessat.restype = ctypes.c_int
_open = _libc.open
_open.argtypes = [ctypes.c_char_p, ctypes.c_int]
_open.restype = ctypes.c_int
#: <fcntl.h> on Linux (the os module has the flag for its own calls, not the numbers)
_AT_FDCWD = -100
_AT_SYMLINK_NOFOLLOW = 0x100


def close(fd: int) -> None:
    """``os.close(fd)``, keeping the GIL; raises OSError as it does."""
    if _close(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def open_dir(path: str | os.PathLike[str]) -> int:
    """``os.open(path, os.O_RDONLY | os.O_DIRECTORY)`` (close-on-exec, as Python opens every
    descriptor), keeping the GIL; raises OSError as it does."""
    raw = os.fsencode(path)
    fd = int(_open(raw, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), os.fsdecode(raw))
    return fd


def exists(path: str) -> bool:
    """``os.access(path, os.F_OK)``, keeping the GIL."""
    return bool(_access(os.fsencode(path), os.F_OK) == 0)


def lexists(path: str) -> bool:
    """Whether ``path`` exists, a symbolic link counting itself (``os.path.lexists``),
    keeping the GIL."""
    found = _faccessat(_AT_FDCWD, os.fsencode(path), os.F_OK, _AT_SYMLINK_NOFOLLOW)
    return bool(found == 0)
