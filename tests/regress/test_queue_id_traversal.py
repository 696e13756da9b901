"""Regression: a queue id is used to build file names; ``../`` in one (from the command line or
a crafted request file in queue/ctl) must never reach outside the spool."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mailsuite.cli import main
from mailsuite.queue.spool import Spool


@pytest.fixture
def config(tmp_path: Path) -> Path:
    cfg = tmp_path / "mailsuite.toml"
    cfg.write_text('[server]\nhostname = "mx.example.test"\ndata_dir = "data"\n')
    victim = tmp_path / "data" / "victim.json"
    victim.parent.mkdir()
    victim.write_text("{}")
    return cfg


@pytest.mark.parametrize("action", ["show", "delete", "bounce", "flush"])
@pytest.mark.parametrize("bad", ["../victim", "../../data/victim", "/etc/passwd", "0" * 50])
def test_cli_refuses_ids_that_are_not_ids(
    config: Path, action: str, bad: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--config", str(config), "queue", action, bad]) == 2
    assert "is not a queue id" in capsys.readouterr().err  # errors go to stderr
    assert (config.parent / "data" / "victim.json").exists()


def test_crafted_request_file_is_ignored(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "queue").ensure()
    (tmp_path / "victim.json").write_text("{}")
    (spool.ctl_dir / "evil.json").write_text(json.dumps({"op": "delete", "id": "../victim"}))
    assert spool.take_requests() == []
    assert (tmp_path / "victim.json").exists()
