"""Files the CLI creates as root are handed to the owner of the data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mailsuite.directory import Directory

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")


def test_cli_as_root_keeps_data_owned_by_the_server_account(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    os.chown(data, 5000, 5000)  # the server's account (no passwd entry needed)
    d = Directory(data / "directory.json", data / "mail", ("example.test",))
    d.add_user("alice@example.test", "$argon2id$dummy")
    for path in [
        data / "directory.json",
        data / "directory.lock",
        data / "mail",
        data / "mail" / "example.test",
        *(data / "mail").rglob("*"),
    ]:
        st = path.lstat()
        assert (st.st_uid, st.st_gid) == (5000, 5000), path


def test_root_owned_data_dir_is_left_alone(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    d = Directory(data / "directory.json", data / "mail", ("example.test",))
    d.add_domain("example.org")
    assert (data / "directory.json").stat().st_uid == 0
