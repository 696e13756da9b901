"""POP3 benchmark: mailsuite and Dovecot side by side with ../shared/bench/pop3_bench.py.

Creates a 1,000-message box (the shared generator), starts mailsuite (``twistd -n mailsuite``)
on a loopback port and, when Dovecot is installed, the shared harness's Dovecot peer
(``peers.sh start dovecot``, ports 10000-10999, its own run directory), runs the same
poplib workload against both (login, STAT, UIDL, RETR of every message, QUIT; one cold and
``--trials`` warm trials) and prints the warm medians and the mailsuite/Dovecot ratios.

    python bench/pop3.py [--count 1000] [--trials 5] [--no-dovecot] [--keep DIR]

Runs as root for the Dovecot peer (its Maildirs belong to uid 5000); mailsuite runs as the
invoking user.  Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mailsuite.testing.process import mailsuite_argv

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("BENCH_DIR", REPO.parent / "shared" / "bench"))
PASSWORD = "benchpass"
STEPS = ("login", "stat", "uidl", "retr_all", "quit", "total")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} did not open")


def run_pop3_bench(
    name: str,
    port: int,
    user: str,
    maildir: Path,
    count: int,
    trials: int,
    out: Path,
    uid: int | None = None,
) -> dict:
    cmd = [
        sys.executable,
        str(SHARED / "pop3_bench.py"),
        "--name",
        name,
        "--port",
        str(port),
        "--user",
        user,
        "--password",
        PASSWORD,
        "--maildir",
        str(maildir),
        "--count",
        str(count),
        "--generate",
        "--trials",
        str(trials),
        "--out",
        str(out),
    ]
    if uid is not None:
        cmd += ["--uid", str(uid)]
    subprocess.run(cmd, cwd=SHARED, check=True, timeout=1800)
    return json.loads(out.read_text())


def bench_mailsuite(work: Path, count: int, trials: int) -> dict:
    port = free_port()
    config = work / "mailsuite.toml"
    config.write_text(
        '[server]\nhostname = "localhost"\ndata_dir = "data"\n\n'
        f'[listen]\npop3 = ["tcp:{port}:interface=127.0.0.1"]\n\n'
        '[domains]\nlocal = ["example.test"]\n\n'
        "[auth]\nallow_plaintext = true\n"  # pop3_bench.py logs in without TLS
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "mailsuite.cli",
            "--config",
            str(config),
            "user",
            "add",
            "pop1k@example.test",
            "--password-stdin",
        ],
        input=PASSWORD + "\n",
        text=True,
        check=True,
        capture_output=True,
    )
    env = dict(os.environ)
    env.pop("PYTHONWARNINGS", None)
    proc = subprocess.Popen(
        mailsuite_argv(str(config), logfile=str(work / "twistd.log")),
        cwd=work,
        env=env,
    )
    try:
        wait_port(port, proc)
        return run_pop3_bench(
            "mailsuite",
            port,
            "pop1k@example.test",
            work / "data" / "mail" / "example.test" / "pop1k",
            count,
            trials,
            work / "pop3-mailsuite.json",
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def bench_dovecot(work: Path, count: int, trials: int) -> dict | None:
    if not shutil.which("dovecot") and not Path("/usr/sbin/dovecot").exists():
        print("[pop3] Dovecot is not installed (../shared/bench/setup-peers.sh): skipped")
        return None
    run = work / "peers"
    work.chmod(0o755)  # Dovecot's auth and mail processes (other uids) read below here
    env = dict(os.environ, RUN=str(run), BENCH_DIR=str(SHARED))
    peers = [str(SHARED / "peers.sh")]
    subprocess.run(["bash", *peers, "start", "dovecot"], env=env, check=True, timeout=120)
    try:
        port = int(os.environ.get("PORT_DOVECOT_POP3", "10110"))
        return run_pop3_bench(
            "dovecot",
            port,
            "pop1k",
            run / "dovecot/users/pop1k/Maildir",
            count,
            trials,
            work / "pop3-dovecot.json",
            uid=5000,
        )
    finally:
        subprocess.run(["bash", *peers, "stop", "dovecot"], env=env, timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--no-dovecot", action="store_true")
    ap.add_argument("--keep", help="work directory to keep (default: a temporary one)")
    a = ap.parse_args()
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="mailsuite-pop3-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        ours = bench_mailsuite(work, a.count, a.trials)
        theirs = None if a.no_dovecot else bench_dovecot(work, a.count, a.trials)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nPOP3, {a.count} messages, warm median of {a.trials} trials (seconds)")
    header = f"{'step':<10}{'mailsuite':>12}"
    if theirs:
        header += f"{'dovecot':>12}{'ratio':>9}"
    print(header)
    for step in STEPS:
        mine = ours["warm"][step]["median"]
        row = f"{step:<10}{mine:>12.4f}"
        if theirs:
            ref = theirs["warm"][step]["median"]
            ratio = mine / ref if ref else float("inf")
            row += f"{ref:>12.4f}{ratio:>8.2f}x"
        print(row)
    print(f"checks: mailsuite {ours['checks_ok']} cold {ours['cold']}")
    if theirs:
        print(f"checks: dovecot {theirs['checks_ok']} cold {theirs['cold']}")
        ratio = ours["warm"]["retr_all"]["median"] / theirs["warm"]["retr_all"]["median"]
        print(f"RETR of all {a.count}: mailsuite/dovecot = {ratio:.2f}x (aim: <= 1.25x)")


if __name__ == "__main__":
    main()
