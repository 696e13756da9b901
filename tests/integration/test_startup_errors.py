"""Problems found while starting stop the start with one line naming the cause, no traceback."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from mailsuite.testing.process import mailsuite_argv
from tests.harness import free_port


def twistd(config: Path) -> tuple[int, str]:
    r = subprocess.run(
        mailsuite_argv(str(config)),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=config.parent,
    )
    return r.returncode, r.stdout + r.stderr


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ('[tls]\ncert = "bad.pem"\nkey = "bad.pem"\n', "[tls] cert: {dir}/bad.pem: not PEM"),
        ('[pop3]\nexpire = "soon"\n', '[pop3] expire: expected "NEVER" or a number of days'),
    ],
)
def test_bad_values_found_while_building(tmp_path: Path, toml: str, needle: str) -> None:
    (tmp_path / "bad.pem").write_text("garbage\n")
    cfg = tmp_path / "m.toml"
    cfg.write_text(
        f'[server]\ndata_dir = "data"\n[listen]\npop3 = ["tcp:{free_port()}:interface=127.0.0.1"]\n'
        + toml
    )
    code, out = twistd(cfg)
    assert code != 0
    assert f"mailsuite: {cfg}: " + needle.format(dir=tmp_path) in out
    assert "Traceback" not in out


def test_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = tmp_path / "m.toml"
        cfg.write_text(
            f'[server]\ndata_dir = "data"\n[listen]\nsmtp = ["tcp:{port}:interface=127.0.0.1"]\n'
        )
        code, out = twistd(cfg)
    assert code != 0
    assert (
        f"[listen] smtp 'tcp:{port}:interface=127.0.0.1': cannot listen: Address already in use"
        in out
    )
    assert "Traceback" not in out
