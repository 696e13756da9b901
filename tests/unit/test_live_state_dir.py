"""Where the worker processes' mmapped shared state goes (prometheus-client's files, the
connection table; mailsuite.workers.live_state_dir): tmpfs when there is one, in a private
folder that every call names alike, and the data folder's run/live when that folder cannot
be ours."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from mailsuite.config import Config, parse_config
from mailsuite.workers import DATA_FOLDER_NOTE, live_state_dir, sweep_live_state


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
    shutil.rmtree(taken)
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


def test_folders_of_data_folders_that_are_gone_are_removed_at_the_next_start(
    tmp_path: Path,
) -> None:
    """A server killed with kill -9 leaves its folder in tmpfs; once its data folder is
    gone (a test's temporary folder) the next server of the account removes it.  The
    folder of a data folder that still exists stays (that server may run, or start again
    and reuse it), and so does anything without the note or not a private folder of ours."""
    shm = tmp_path / "shm"
    shm.mkdir()
    gone_cfg, kept_cfg = config(tmp_path, "gone"), config(tmp_path, "kept")
    gone_cfg.data_dir.mkdir()
    kept_cfg.data_dir.mkdir()
    gone = live_state_dir(gone_cfg, shm)
    (gone / "counter_1.db").write_bytes(b"x" * 1000)  # what a killed server leaves
    kept = live_state_dir(kept_cfg, shm)
    assert (gone / DATA_FOLDER_NOTE).read_text() == str(gone_cfg.data_dir.resolve())
    unnoted = shm / f"mailsuite-live-{os.geteuid()}-0000000000000000"
    unnoted.mkdir(mode=0o700)
    others = shm / "mailsuite-live-99999-0000000000000000"
    others.mkdir(mode=0o700)
    (others / DATA_FOLDER_NOTE).write_text(str(tmp_path / "nowhere"))
    gone_cfg.data_dir.rmdir()  # the test that killed it cleaned up its temporary folder

    new_cfg = config(tmp_path, "new")
    new_cfg.data_dir.mkdir()
    live_state_dir(new_cfg, shm)  # another server starts
    assert not gone.exists()
    assert kept.is_dir() and unnoted.is_dir() and others.is_dir()
    assert sweep_live_state(shm, os.geteuid(), keep=kept) == 0  # nothing more to remove


def test_no_note_before_the_data_folder_exists(tmp_path: Path) -> None:
    """A new server asks for its live-state folder before it makes its data folder: a note
    then would have a server starting at the same moment sweep the folder away."""
    shm = tmp_path / "shm"
    shm.mkdir()
    cfg = config(tmp_path, "fresh")
    path = live_state_dir(cfg, shm)
    assert not (path / DATA_FOLDER_NOTE).exists()
    other = config(tmp_path, "other")
    other.data_dir.mkdir()
    live_state_dir(other, shm)  # another server starts: nothing of the new one is removed
    assert path.is_dir()
    cfg.data_dir.mkdir()
    assert live_state_dir(cfg, shm) == path  # asked again once made: noted now
    assert (path / DATA_FOLDER_NOTE).read_text() == str(cfg.data_dir.resolve())
