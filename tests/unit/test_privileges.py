"""Started as root with --uid/--gid, the server hands its data folder to that account."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from twisted.scripts.twistd import ServerOptions

from mailsuite import tap
from mailsuite.config import load_config
from mailsuite.directory import Directory
from mailsuite.workers import SHM, live_state_dir

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")


def owners(root: Path) -> set[tuple[int, int]]:
    return {(p.lstat().st_uid, p.lstat().st_gid) for p in [root, *root.rglob("*")]}


def test_twistd_uid_gid_reach_the_data_folder(tmp_path: Path) -> None:
    cfg = tmp_path / "m.toml"
    cfg.write_text(
        '[server]\ndata_dir = "data"\nhostname = "mx.example.test"\n'
        '[listen]\nsmtp = ["tcp:0:interface=127.0.0.1"]\nimaps = ["tcp:0:interface=127.0.0.1"]\n'
        '[domains]\nlocal = ["example.test"]\n'
    )
    # set up as root first, as an admin would: the user's Maildir is root's
    data = tmp_path / "data"
    Directory(data / "directory.json", data / "mail", ("example.test",)).add_user(
        "alice@example.test", "$argon2id$dummy"
    )
    assert (0, 0) in owners(data)

    options = ServerOptions()
    options.parseOptions(["--uid", "5000", "--gid", "5001", "mailsuite", "--config", str(cfg)])
    service = tap.makeService(options.subOptions)
    assert service is not None
    # everything, including the self-signed certificate made for imaps, now belongs to 5000
    assert owners(data) == {(5000, 5001)}
    assert (data / "tls" / "selfsigned.key").stat().st_uid == 5000
    # with workers, the metrics files live in tmpfs: that folder is the account's too
    metrics = live_state_dir(load_config(cfg), owner=5000)
    try:
        assert metrics.parent == SHM and any(metrics.iterdir())
        assert owners(metrics) == {(5000, 5001)}
        assert metrics.stat().st_mode & 0o777 == 0o700
    finally:
        shutil.rmtree(metrics, ignore_errors=True)  # the service never ran to remove it


def test_without_uid_nothing_changes_hands(tmp_path: Path) -> None:
    cfg = tmp_path / "m.toml"
    cfg.write_text('[server]\ndata_dir = "data"\n[listen]\nsmtp = ["tcp:0:interface=127.0.0.1"]\n')
    options = ServerOptions()
    options.parseOptions(["mailsuite", "--config", str(cfg)])
    tap.makeService(options.subOptions)
    assert owners(tmp_path / "data") == {(0, 0)}
    shutil.rmtree(live_state_dir(load_config(cfg)), ignore_errors=True)
