"""Config loading: the embedded default, the example file, and errors that name file and key."""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

import pytest

from mailsuite.config import DEFAULT_TOML, ConfigError, load_config
from mailsuite.testing.process import mailsuite_argv

ROOT = Path(__file__).resolve().parents[2]


def test_example_file_matches_embedded_default() -> None:
    example = tomllib.loads((ROOT / "etc" / "mailsuite.toml").read_text())
    assert example == tomllib.loads(DEFAULT_TOML)


def test_embedded_default_is_a_working_local_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None)
    assert cfg.data_dir == tmp_path / "mailsuite-data"
    assert cfg.local_domains == ("example.test",)
    assert cfg.listen["smtp"] == ("tcp:2525:interface=127.0.0.1",)
    assert all("127.0.0.1" in d for descs in cfg.listen.values() for d in descs)
    assert cfg.relay.trusted_networks == ()  # never an open relay, loopback included


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    f = tmp_path / "sub" / "m.toml"
    f.parent.mkdir()
    f.write_text('[server]\ndata_dir = "d"\nhostname = "mx.example.org"\n')
    cfg = load_config(f)
    assert cfg.data_dir == tmp_path / "sub" / "d"
    assert cfg.hostname == "mx.example.org"
    assert cfg.listen["imap"] == ()  # no key: does not listen


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[server\n", "not valid TOML"),
        ("[nonsense]\n", "[nonsense]: unknown section"),
        ('[server]\nhostnme = "x"\n', "[server] hostnme: unknown key"),
        ("[server]\nhostname = 5\n", "[server] hostname: expected str"),
        ('[listen]\nsmtp = "tcp:25"\n', "[listen] smtp: expected list"),
        ('[listen]\nsmtp = ["bogus:25"]\n', "[listen] smtp: 'bogus:25' is not a server endpoint"),
        ('[listen]\nsmtp = ["tcp:99999"]\n', "[listen] smtp: 'tcp:99999' has no valid port"),
        ('[tls]\ncert = "c.pem"\n', "[tls] key: cert and key must be given together"),
        ('[tls]\ncert = "c.pem"\nkey = "k.pem"\n', "[tls] cert:"),
        (
            '[relay]\ntrusted_networks = ["10.0.0.0/33"]\n',
            "[relay] trusted_networks: '10.0.0.0/33'",
        ),
        ("[smtp]\nmax_recipients = 0\n", "[smtp] max_recipients: must be at least 100"),
        ('[domains]\nlocal = ["bad..domain"]\n', "[domains] local: 'bad..domain' is not a valid"),
        ('[dns]\nnameservers = ["not-an-ip"]\n', "[dns] nameservers:"),
        ("[smtp]\ntimeout = true\n", "[smtp] timeout: expected an integer"),
        ("[dns]\ntimeout = 0\n", "[dns] timeout: must be at least 1"),
        ('[mail_auth]\ndmarc_reject = "drop"\n', "[mail_auth] dmarc_reject: 'drop'"),
        ("[mail_auth]\nmax_signatures = 0\n", "[mail_auth] max_signatures: must be at least 1"),
        ('[mail_auth]\nspf = "yes"\n', "[mail_auth] spf: expected bool"),
        ("[mail_auth]\ndkmi = true\n", "[mail_auth] dkmi: unknown key"),
        ("[smtp]\nmin_free_space = -1\n", "[smtp] min_free_space: must be at least 0"),
        ('[smtp]\nmin_free_space = "1G"\n', "[smtp] min_free_space: expected int"),
    ],
)
def test_errors_name_file_key_and_problem(tmp_path: Path, text: str, needle: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(f)
    assert str(err.value).startswith(str(f))
    assert needle in str(err.value)


def test_min_free_space_default_and_off(tmp_path: Path) -> None:
    f = tmp_path / "m.toml"
    f.write_text("[smtp]\nmax_message_size = 2048\n")
    assert load_config(f).smtp.min_free_space is None  # the larger of 2 x 2048 and 1% of the fs
    f.write_text("[smtp]\nmin_free_space = 0\n")
    assert load_config(f).smtp.min_free_space == 0  # never refuse


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path / "nope.toml")


def test_twistd_refuses_bad_config_with_one_line(tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text('[listen]\nsmtp = ["tcp:notaport"]\n')
    result = subprocess.run(
        mailsuite_argv(str(f)),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert f"{f}: [listen] smtp: 'tcp:notaport' has no valid port" in out
    assert "Traceback" not in out


def test_mail_auth_defaults_and_values(tmp_path: Path) -> None:
    cfg = load_config(None)
    assert (
        cfg.mail_auth.spf,
        cfg.mail_auth.dkim,
        cfg.mail_auth.dmarc,
        cfg.mail_auth.arc,
        cfg.mail_auth.sign,
    ) == (True, True, True, True, True)
    assert cfg.mail_auth.dmarc_reject == "reject" and cfg.mail_auth.max_signatures == 5
    assert cfg.dns.timeout == 10 and cfg.nameservers is None
    f = tmp_path / "m.toml"
    f.write_text(
        '[dns]\nnameservers = ["127.0.0.1:5353"]\ntimeout = 3\n'
        '[mail_auth]\nspf = false\ndmarc_reject = "quarantine"\nmax_signatures = 2\n'
        "threads = 2\nsign = false\n"
    )
    cfg = load_config(f)
    assert cfg.nameservers == ("127.0.0.1:5353",) and cfg.dns.timeout == 3
    assert not cfg.mail_auth.spf and cfg.mail_auth.dmarc_reject == "quarantine"
    assert (cfg.mail_auth.max_signatures, cfg.mail_auth.threads) == (2, 2)
    assert not cfg.mail_auth.sign and cfg.mail_auth.verifies
    assert cfg.dkim_dir == cfg.data_dir / "dkim"


@pytest.mark.parametrize(
    ("value", "mode", "expected"),
    [
        ('"auto"', "server", None),
        ("1", "server", 1),
        ("3", "server", 3),
        ('"auto"', "sandbox", 1),
        ("1", "sandbox", 1),
    ],
)
def test_server_workers(tmp_path: Path, value: str, mode: str, expected: int | None) -> None:
    """``[server] workers``: "auto" is one per core up to 4 (one in the sandbox, whose events
    live in one process); a number is taken as it is."""
    import os

    from mailsuite.workers import AUTO_CAP, count

    f = tmp_path / "c.toml"
    f.write_text(f'[server]\nworkers = {value}\nmode = "{mode}"\n')
    want = expected if expected is not None else max(1, min(os.cpu_count() or 1, AUTO_CAP))
    assert count(load_config(f)) == want


@pytest.mark.parametrize(
    ("value", "mode"),
    [("0", "server"), ("65", "server"), ('"many"', "server"), ("true", "server"), ("2", "sandbox")],
)
def test_server_workers_errors(tmp_path: Path, value: str, mode: str) -> None:
    f = tmp_path / "c.toml"
    f.write_text(f'[server]\nworkers = {value}\nmode = "{mode}"\n')
    with pytest.raises(ConfigError, match=r"c\.toml: \[server\] workers: expected"):
        load_config(f)
