"""Keep files in the data folder owned by the account the server runs as.

In production twistd starts as root, binds the privileged ports, then drops to ``--uid`` /
``--gid`` (e.g. ``mail``).  Anything created as root before that (the data folder, a
self-signed certificate) or later by ``mailsuite`` run as root (``directory.json``, a new
user's Maildir) would be unreadable to the server.  These helpers hand such files to the
right owner: the server's uid/gid at start-up, or the owner of the data folder for the CLI.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


def _chown(path: Path, uid: int, gid: int) -> None:
    try:
        st = path.lstat()
        if (st.st_uid, st.st_gid) != (uid, gid):
            os.lchown(path, uid, gid)
    except FileNotFoundError:
        pass


def give_to(paths: Iterable[Path], uid: int, gid: int) -> None:
    """chown each path (not following links) when running as root; a no-op otherwise."""
    if os.geteuid() != 0:
        return
    for path in paths:
        _chown(path, uid, gid)


def give_tree_to(root: Path, uid: int, gid: int) -> None:
    """chown ``root`` and everything below it (for trees we just created, e.g. a Maildir)."""
    if os.geteuid() != 0:
        return
    _chown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            _chown(Path(dirpath) / name, uid, gid)


def like_data_dir(data_dir: Path, paths: Iterable[Path], tree: bool = False) -> None:
    """Give ``paths`` the owner of ``data_dir`` when the CLI runs as root and the data folder
    belongs to someone else (the server's account)."""
    if os.geteuid() != 0:
        return
    try:
        st = data_dir.stat()
    except FileNotFoundError:
        return
    if st.st_uid == 0:
        return
    for path in paths:
        if tree:
            give_tree_to(path, st.st_uid, st.st_gid)
        else:
            give_to([path], st.st_uid, st.st_gid)
