"""This process's id without a system call per use.

glibc no longer caches ``getpid()`` (since 2.25), so ``os.getpid()`` is a system call; the SMTP
path asked twice per message (the transaction id, the Maildir unique name).  The id is kept
here and taken again in a child after ``fork`` (:func:`os.register_at_fork`); a program run
with ``exec`` imports this module afresh."""

from __future__ import annotations

import os

_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


def pid() -> int:
    """``os.getpid()``, from memory."""
    return _pid
