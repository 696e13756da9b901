"""The calls that keep the GIL behave as the ``os`` functions they replace."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from mailsuite import gil_calls


def test_close_closes_and_raises_as_os_close(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o600)
    gil_calls.close(fd)
    with pytest.raises(OSError) as caught:
        os.fstat(fd)  # closed
    assert caught.value.errno == 9
    with pytest.raises(OSError) as again:
        gil_calls.close(fd)
    assert again.value.errno == 9  # EBADF, as os.close raises


def test_exists_and_lexists_see_files_and_links_as_os_path(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"x")
    (tmp_path / "dangling").symlink_to(tmp_path / "nothing")
    (tmp_path / "link").symlink_to(tmp_path / "file")
    expected = {"file": (True, True), "dangling": (False, True), "link": (True, True)}
    for name in ("file", "dangling", "link", "nothing"):
        path = str(tmp_path / name)
        assert (gil_calls.exists(path), gil_calls.lexists(path)) == expected.get(
            name, (False, False)
        ), name


def test_open_dir_opens_a_directory_close_on_exec_and_refuses_the_rest(tmp_path: Path) -> None:
    fd = gil_calls.open_dir(tmp_path)
    try:
        os.fsync(fd)
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert os.fstat(fd).st_ino == tmp_path.stat().st_ino
    finally:
        gil_calls.close(fd)
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(NotADirectoryError):
        gil_calls.open_dir(tmp_path / "file")
    with pytest.raises(FileNotFoundError) as caught:
        gil_calls.open_dir(str(tmp_path / "missing"))
    assert caught.value.filename == str(tmp_path / "missing")
