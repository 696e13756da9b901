"""Maildir folders made for store and POP3 unit tests."""

from __future__ import annotations

from pathlib import Path

from mailsuite.store.maildir import ensure_folder
from mailsuite.store.write import write_message


def box(tmp_path: Path, n: int) -> Path:
    """A Maildir folder ``tmp_path/box`` with ``n`` small messages, "Subject: 0" onwards."""
    root = ensure_folder(tmp_path / "box")
    for i in range(n):
        write_message(root, [b"Subject: %d\n\nbody\n" % i])
    return root
