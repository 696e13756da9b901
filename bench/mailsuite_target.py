"""Start and stop one mailsuite server for the benchmarks (SMTP, IMAP, POP3 alike).

    python bench/mailsuite_target.py start --dir DIR [--services smtp,imap,pop3,web]
    python bench/mailsuite_target.py stop --dir DIR

``start`` writes ``DIR/mailsuite.toml`` (127.0.0.1 only, free ports, plaintext logins
allowed because the benchmark clients do not speak TLS), creates the users the shared
harness expects (``bench``, ``big10000``, ``big100000``, ``pop1k``, ``idle`` in
``example.test``, all with the benchmark password) with the real ``mailsuite`` CLI, starts
``twistd -n mailsuite`` in its own session, waits until every port accepts connections,
and prints shell assignments for ``eval``::

    MS_PID=...  MS_SMTP_PORT=...  MS_IMAP_PORT=...  MS_POP3_PORT=...  MS_WEB_PORT=...
    MS_MAILDIR_FMT=DIR/data/mail/example.test/{user}  MS_LOG=DIR/twistd.log

``stop`` ends exactly the process whose PID ``start`` recorded in ``DIR/pid`` (TERM, then
KILL after 10 s).  Nothing else is touched.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

USERS = ("bench", "big10000", "big100000", "pop1k", "idle")
SERVICES = ("smtp", "imap", "pop3", "web")  # web: /metrics (reactor lag) and /healthz


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise SystemExit(f"mailsuite exited with {proc.returncode} during start:\n{tail}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"mailsuite port {port} did not open within {timeout}s")


def _toml_workers(value: str) -> str:
    """``--workers`` as a TOML value: a number as is, "auto" quoted."""
    return value if value.isdigit() else f'"{value}"'


#: ``--connection-limits off``: for a benchmark that opens more sessions from one address
#: than the default limits allow (the default runs the server's default configuration:
#: since the shared counts are a shared-memory table, a few microseconds a connection)
NO_LIMITS = (
    "[smtp]\nmax_connections = 0\nmax_connections_per_ip = 0\n"
    "[imap]\nmax_connections = 0\nmax_connections_per_ip = 0\nmax_userip_connections = 0\n"
    "[pop3]\nmax_connections = 0\nmax_connections_per_ip = 0\n"
)


def start(a: argparse.Namespace) -> None:
    # imported here, not at the top: ``stop`` must work without the package importable (a
    # benchmark's cleanup that cannot import would leave its server running)
    from mailsuite.testing.process import mailsuite_argv

    root = Path(a.dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    services = [s for s in a.services.split(",") if s]
    for s in services:
        if s not in SERVICES:
            raise SystemExit(f"unknown service {s!r} (choose from {', '.join(SERVICES)})")
    ports = {s: free_port() for s in services}
    config = root / "mailsuite.toml"
    listen = "\n".join(f'{s} = ["tcp:{p}:interface=127.0.0.1"]' for s, p in ports.items())
    config.write_text(
        "# benchmark instance (bench/mailsuite_target.py): loopback only\n"
        f'[server]\nhostname = "mx.{a.domain}"\ndata_dir = "data"\n'
        f"workers = {_toml_workers(a.workers)}\n\n"
        f"[listen]\n{listen}\n\n"
        f'[domains]\nlocal = ["{a.domain}"]\n\n'
        # The benchmark clients log in without TLS, many times, from one address.
        "[auth]\nallow_plaintext = true\nmax_failures_per_ip = 100000\n"
        "max_failures_per_user = 100000\n"
        f"{NO_LIMITS if a.connection_limits == 'off' else ''}"
        f"{a.extra_toml}\n"
    )
    cli = [a.python, "-m", "mailsuite.cli", "--config", str(config)]
    for user in USERS:
        subprocess.run(
            [*cli, "user", "add", f"{user}@{a.domain}", "--password-stdin"],
            input=(a.password + "\n").encode(),
            check=True,
            capture_output=True,
            timeout=120,
        )
    maildir_fmt = root / "data" / "mail" / a.domain / "{user}"
    for user in USERS:  # the harness counts and clears these directly
        for sub in ("cur", "new", "tmp"):
            (root / "data" / "mail" / a.domain / user / sub).mkdir(
                parents=True, exist_ok=True, mode=0o700
            )
    log = root / "twistd.log"
    env = dict(os.environ)
    env.pop("PYTHONWARNINGS", None)
    with (root / "twistd.out").open("wb") as out:
        proc = subprocess.Popen(
            mailsuite_argv(str(config), logfile=str(log), python=a.python),
            cwd=root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    (root / "pid").write_text(f"{proc.pid}\n")
    for port in ports.values():
        wait_port(port, proc, log)
    values = {
        "MS_PID": str(proc.pid),
        "MS_DIR": str(root),
        "MS_CONFIG": str(config),
        "MS_LOG": str(log),
        "MS_MAILDIR_FMT": str(maildir_fmt),
        "MS_SMTP_PORT": str(ports.get("smtp", "")),
        "MS_IMAP_PORT": str(ports.get("imap", "")),
        "MS_POP3_PORT": str(ports.get("pop3", "")),
        "MS_WEB_PORT": str(ports.get("web", "")),
    }
    for k, v in values.items():
        print(f"{k}={shlex.quote(v)}")


def stop(a: argparse.Namespace) -> None:
    pidfile = Path(a.dir) / "pid"
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pidfile.unlink(missing_ok=True)
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            # reap it if it is our child (it is not when start ran in another process)
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                break
        except ChildProcessError:
            pass
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    pidfile.unlink(missing_ok=True)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start")
    s.add_argument("--dir", required=True)
    s.add_argument("--services", default="smtp", help="comma list of smtp,imap,pop3,web")
    s.add_argument("--domain", default=os.environ.get("BENCH_DOMAIN", "example.test"))
    s.add_argument("--password", default=os.environ.get("BENCH_PASS", "benchpass"))
    s.add_argument("--python", default=os.environ.get("MAILSUITE_PYTHON", sys.executable))
    s.add_argument(
        "--workers",
        default=os.environ.get("MAILSUITE_WORKERS", "1"),
        help='[server] workers: a number or "auto" (default 1, or $MAILSUITE_WORKERS)',
    )
    s.add_argument("--extra-toml", default="", help="TOML appended to the config (new sections)")
    s.add_argument(
        "--connection-limits",
        choices=("default", "off"),
        default=os.environ.get("MAILSUITE_BENCH_LIMITS", "default"),
        help="the default max_connections* (default), or none (off)",
    )
    p = sub.add_parser("stop")
    p.add_argument("--dir", required=True)
    a = ap.parse_args()
    start(a) if a.cmd == "start" else stop(a)


if __name__ == "__main__":
    main()
