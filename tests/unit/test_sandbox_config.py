"""Sandbox mode's configuration: the embedded default behind ``--sandbox``, its documented
copy, ``[server] mode`` and ``[sandbox]`` validation, and inbox names."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from twisted.python import usage

from mailsuite.config import ConfigError, load_config
from mailsuite.sandbox.defaults import SANDBOX_TOML
from mailsuite.sandbox.inboxes import folder_name, inbox_name, name_of_folder
from mailsuite.tap import Options

ROOT = Path(__file__).resolve().parents[2]


def test_documented_sandbox_file_matches_the_embedded_one() -> None:
    example = tomllib.loads((ROOT / "etc" / "mailsuite-sandbox.toml").read_text())
    assert example == tomllib.loads(SANDBOX_TOML)


def test_sandbox_option_runs_mailpits_ports_on_loopback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    options = Options()
    options.parseOptions(["--sandbox"])
    cfg = options.config
    assert cfg.mode == "sandbox"
    assert cfg.data_dir == tmp_path / "mailsuite-sandbox"
    assert cfg.listen["smtp"] == ("tcp:1025:interface=127.0.0.1",)
    assert cfg.listen["web"] == ("tcp:8025:interface=127.0.0.1",)
    assert cfg.listen["imap"] == ("tcp:1143:interface=127.0.0.1",)
    assert cfg.listen["pop3"] == ("tcp:1110:interface=127.0.0.1",)
    assert cfg.sandbox.max_messages == 5000 and cfg.sandbox.release is False
    assert cfg.auth.allow_plaintext  # any password works: clear text is allowed
    with pytest.raises(usage.UsageError, match="mode"):
        Options().parseOptions(["--sandbox", "--config", str(tmp_path / "x.toml")])


def test_server_mode_keeps_its_defaults() -> None:
    cfg = load_config(None)
    assert cfg.mode == "server" and not cfg.auth.allow_plaintext


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[server]\nmode = "capture"\n', r"\[server\] mode: expected one of server, sandbox"),
        (
            '[server]\nmode = "sandbox"\n[sandbox]\nmax_messages = 0\n',
            r"\[sandbox\] max_messages: must be at least 1",
        ),
        (
            '[server]\nmode = "sandbox"\n[sandbox]\nrelease = "yes"\n',
            r"\[sandbox\] release: expected bool",
        ),
        ("[sandbox]\nkeep = 3\n", r"\[sandbox\] keep: unknown key"),
        (
            '[server]\nmode = "sandbox"\n[listen]\nmanagesieve = ["tcp:4190"]\n',
            r"\[listen\] managesieve: not available in sandbox mode",
        ),
    ],
)
def test_bad_sandbox_settings_name_file_and_key(tmp_path: Path, toml: str, message: str) -> None:
    f = tmp_path / "m.toml"
    f.write_text(toml)
    with pytest.raises(ConfigError, match=f"{f}: {message}"):
        load_config(f)


def test_sandbox_may_still_require_tls_for_passwords(tmp_path: Path) -> None:
    f = tmp_path / "m.toml"
    f.write_text('[server]\nmode = "sandbox"\n[auth]\nallow_plaintext = false\n')
    assert load_config(f).auth.allow_plaintext is False


def test_inbox_names_and_their_folders() -> None:
    assert inbox_name(None) == "default"
    assert inbox_name(" Alice@Example.COM ") == "alice@example.com"
    assert inbox_name("") is None and inbox_name("a\nb") is None and inbox_name("x" * 129) is None
    for name in ("alice", "team/qa", "..", ".hidden", "a b", "ünï"):
        folder = folder_name(name)
        assert "/" not in folder and not folder.startswith(".")
        assert name_of_folder(folder) == name
