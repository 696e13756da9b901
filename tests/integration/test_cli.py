"""The `mailsuite` admin command, run as a person runs it."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

from mailsuite.testing.process import twistd_argv
from tests.harness import PASSWORD, Server

ROOT = Path(__file__).resolve().parents[2]


def test_users_aliases_domains(tmp_path: Path) -> None:
    srv = Server(tmp_path)
    out = srv.cli("user", "add", "Alice@Example.test", "--password-stdin", stdin=PASSWORD + "\n")
    assert "added alice@example.test" in out.stdout
    assert PASSWORD not in out.stdout + out.stderr
    data = json.loads((srv.data / "directory.json").read_text())
    stored = data["users"]["alice@example.test"]["password"]
    assert stored.startswith("$argon2id$") and PASSWORD not in stored
    # special-use folders are made with the user
    for folder in ("Sent", "Drafts", "Trash", "Junk", "Archive"):
        assert (srv.maildir("alice@example.test", folder) / "cur").is_dir()

    dup = srv.cli(
        "user", "add", "alice@example.test", "--password-stdin", stdin="x" * 10 + "\n", check=False
    )
    assert dup.returncode == 2 and "exists already" in dup.stderr
    short = srv.cli(
        "user", "add", "bob@example.test", "--password-stdin", stdin="short\n", check=False
    )
    assert short.returncode == 2 and "at least 8" in short.stderr
    foreign = srv.cli(
        "user", "add", "bob@other.test", "--password-stdin", stdin=PASSWORD + "\n", check=False
    )
    assert foreign.returncode == 2 and "mailsuite domain add other.test" in foreign.stderr

    srv.cli("user", "passwd", "alice@example.test", "--password-stdin", stdin="new password!\n")
    new = json.loads((srv.data / "directory.json").read_text())["users"]["alice@example.test"]
    assert new["password"] != stored

    srv.cli("domain", "add", "other.test")
    assert "other.test\t(directory)" in srv.cli("domain", "list").stdout
    assert "example.test\t(config)" in srv.cli("domain", "list").stdout
    srv.add_user("bob@other.test")
    assert srv.cli("user", "list").stdout.split() == ["alice@example.test", "bob@other.test"]

    srv.cli("alias", "add", "sales@example.test", "alice@example.test", "bob@other.test")
    srv.cli("alias", "add", "@other.test", "bob@other.test")
    listing = srv.cli("alias", "list").stdout
    assert "sales@example.test -> alice@example.test, bob@other.test" in listing
    assert "@other.test -> bob@other.test" in listing
    srv.cli("alias", "del", "sales@example.test", "bob@other.test")
    assert "sales@example.test -> alice@example.test\n" in srv.cli("alias", "list").stdout

    sendas = srv.cli("user", "send-as", "alice@example.test", "boss@example.test").stdout
    assert "boss@example.test" in sendas and "sales@example.test" in sendas

    gone = srv.cli("user", "del", "bob@other.test").stdout
    assert "its mail is kept" in gone
    assert srv.maildir("bob@other.test").is_dir()
    assert srv.cli("user", "del", "bob@other.test", check=False).returncode == 2

    check = srv.cli("check").stdout
    assert "listen smtp" in check and check.strip().endswith("ok")


def test_bad_config_is_reported_not_traced(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nnope = 1\n")
    r = subprocess.run(
        [sys.executable, "-m", "mailsuite.cli", "--config", str(bad), "user", "list"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert (
        r.stderr.strip()
        == f"mailsuite: {bad}: [server] nope: unknown key (check the spelling against etc/mailsuite.toml)"
    )


def test_twistd_finds_the_plugin() -> None:
    r = subprocess.run(
        twistd_argv("--help"),
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert "mailsuite" in r.stdout


def test_wheel_ships_plugin_without_shadowing_twisted(tmp_path: Path) -> None:
    """`pip install .` path: the wheel carries twisted/plugins/mailsuite_plugin.py but no
    twisted/__init__.py or twisted/plugins/__init__.py (that would hide Twisted itself)."""
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    wheel = next(tmp_path.glob("mailsuite-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "twisted/plugins/mailsuite_plugin.py" in names
    assert "twisted/__init__.py" not in names and "twisted/plugins/__init__.py" not in names
    assert "mailsuite/smtp/protocol.py" in names
    # installed on its own into a fresh target, twistd from that path finds the plugin
    target = tmp_path / "site"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    code = (
        "import sys; sys.path[:] = [p for p in sys.path if 'site-packages' in p or 'lib/python' in p];"
        f"sys.path.insert(0, {str(target)!r});"
        "sys.path = [p for p in sys.path if p != " + repr(str(ROOT)) + "];"
        "import twisted.plugins, mailsuite;"
        f"assert mailsuite.__file__.startswith({str(target)!r}), mailsuite.__file__;"
        "from twisted.plugin import getPlugins; from twisted.application.service import IServiceMaker;"
        "print([p.tapname for p in getPlugins(IServiceMaker)])"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr
    assert "'mailsuite'" in r.stdout


def test_check_loads_the_certificates(tmp_path: Path) -> None:
    (tmp_path / "bad.pem").write_text("garbage\n")
    cfg = tmp_path / "m.toml"
    cfg.write_text('[server]\ndata_dir = "d"\n[tls]\ncert = "bad.pem"\nkey = "bad.pem"\n')
    r = subprocess.run(
        [sys.executable, "-m", "mailsuite.cli", "--config", str(cfg), "check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert f"{cfg}: [tls] cert: {tmp_path}/bad.pem: not PEM" in r.stderr
