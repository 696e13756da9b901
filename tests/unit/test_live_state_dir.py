"""Where the worker processes' mmapped shared state goes (prometheus-client's files, the
connection table; mailsuite.workers.live_state_dir): tmpfs when there is one, in a private
folder that every call names alike, and the data folder's run/live when that folder cannot
be ours."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mailsuite.config import Config, parse_config
from mailsuite.workers import live_state_dir


def config(tmp_path: Path, name: str = "data") -> Config:
    data = {"server": {"hostname": "mx.example.test", "data_dir": str(tmp_path / name)}}
    return parse_config(data, None, tmp_path)


def test_a_private_folder_in_tmpfs_named_alike_on_every_call(tmp_path: Path) -> None:
    shm = tmp_path / "shm"
    shm.mkdir()
    cfg = config(tmp_path)
    path = live_state_dir(cfg, shm)
    assert path.parent == shm and path.is_dir()
    st = path.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (os.geteuid(), 0o700)
    assert live_state_dir(cfg, shm) == path  # the supervisor and its workers agree
    assert live_state_dir(config(tmp_path, "other"), shm) != path  # one per data folder


def test_a_name_that_is_not_our_private_folder_falls_back_to_the_data_folder(
    tmp_path: Path,
) -> None:
    shm = tmp_path / "shm"
    shm.mkdir()
    cfg = config(tmp_path)
    taken = live_state_dir(cfg, shm)
    taken.chmod(0o777)  # as another user could have made it: readable by others
    assert live_state_dir(cfg, shm) == cfg.data_dir / "run" / "live"
    taken.rmdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    taken.symlink_to(elsewhere)  # a planted symlink is never followed
    assert live_state_dir(cfg, shm) == cfg.data_dir / "run" / "live"
    assert live_state_dir(cfg, tmp_path / "no-such-dir") == cfg.data_dir / "run" / "live"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
def test_made_for_the_account_that_serves_when_started_as_root(tmp_path: Path) -> None:
    shm = tmp_path / "shm"
    shm.mkdir()
    cfg = config(tmp_path)
    path = live_state_dir(cfg, shm, owner=5000)
    assert path.stat().st_uid == 5000 and path.name.startswith("mailsuite-live-5000-")
    assert live_state_dir(cfg, shm, owner=5000) == path
    assert live_state_dir(cfg, shm) != path  # root's own would be another folder
