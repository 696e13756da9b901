"""CPU per SMTP message of mailsuite and of Postfix, and of the client, in the same rounds.

Throughput figures on a shared machine move with the other load; the CPU the server's own
processes spend per message does not (much), so this is what to compare between two trees
and with Postfix.  On a machine whose cores are saturated, the rate is roughly
``cores / (server CPU + client CPU + kernel work charged to no one of them)`` per message,
so the CPU figures explain the rate ratio.

    python3 bench/smtp_cpu.py --target w2-noauth --target main:w2-noauth=/path/to/tree \\
        --target postfix --msgs 1000 --rounds 3 [--strace-msgs 300]

A target is ``[LABEL:]wN[-noauth][-nolimits][=TREE]``: mailsuite with ``[server] workers =
N`` (every ``[mail_auth]`` check off with ``-noauth``; every connection limit off with
``-nolimits``, else the defaults), run from TREE through ``PYTHONPATH`` (default: this
tree); or ``[LABEL:]postfix``: Postfix as the shared harness starts it (``peers.sh start
postfix``: virtual(8) delivery to a Maildir), with its own ``RUN`` directory and a free port.
Each is started once (loopback, a temporary directory); then, round by round in rotating
order, smtp-source sends ``--msgs`` messages of ``--size`` bytes over ``--sessions``
sessions (a new connection per message) and the script waits until all are in the Maildir.

What is counted, from ``/proc/PID/stat`` before and after each round: user and system CPU
of every process of the server -- the process tree under the server's first process
(twistd, or Postfix's master), each live process's utime/stime plus its cutime/cstime, the
CPU of its children that exited and were reaped (Postfix's master reaps smtpd, cleanup,
virtual... when they reach max_use or max_idle; the sum over the tree counts every process
once: a child is either alive, or reaped into its parent's c-times).  For mailsuite the
supervisor (twistd) is also shown apart (``sup``).  The client's CPU is smtp-source's, from
``getrusage(RUSAGE_CHILDREN)`` around its run.  ``cs`` is the server's context switches per
message (from ``/proc/PID/task/*/status``: live threads only, so a Postfix process that
exited during the round is missing from it), less disturbed by other load than CPU time.
Medians over the rounds, the spread and the load average are printed.

``--keep-mail`` (or ``-keep`` at the end of one target: ``postfix-keep``, ``w2-noauth-keep``)
leaves the messages of earlier rounds in the Maildir (and counts the new ones) instead of
clearing new/ and cur/ before each round as the shared harness does:
ext4 without a journal skips recently deleted inodes when it allocates one, so the clearing
makes the next round's file creates dearer (see bench/README.md).

``--strace-msgs N`` adds, after the rounds, one round of N messages per target under
``strace -c -f`` (attached to every process of the server; smtp-source run under it too)
and prints system calls per message, server and client, with the commonest calls.
Every server it started is stopped by PID on exit.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import resource
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED_BENCH = Path(os.environ.get("SHARED_BENCH", HERE.parent.parent / "shared" / "bench"))
TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> tuple[float, float]:
    """(user, system) seconds of ``pid`` and of its reaped children."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # after the command: state=0 ... utime=11 stime=12 cutime=13 cstime=14
    user = int(fields[11]) + int(fields[13])
    system = int(fields[12]) + int(fields[14])
    return user / TICK, system / TICK


def children(pid: int) -> list[int]:
    kids: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                kids += [int(p) for p in (task / "children").read_text().split()]
    return kids


def tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children(p)
    return out


def switches(pid: int) -> int:
    """Context switches, voluntary and not, of every thread of ``pid`` (live threads only)."""
    total = 0
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                for line in (task / "status").read_text().splitlines():
                    if "ctxt_switches:" in line:
                        total += int(line.split()[1])
    return total


def snapshot(pid: int) -> dict[str, float]:
    """User and system CPU seconds of the whole tree; ``sup``: the first process alone;
    ``cs``: context switches of the tree's live threads."""
    out = {"user": 0.0, "sys": 0.0, "sup": 0.0, "cs": 0.0}
    for p in tree(pid):
        with contextlib.suppress(OSError):  # exited meanwhile: counted in its parent's c-times
            u, s = proc_cpu(p)
            out["user"] += u
            out["sys"] += s
            if p == pid:
                out["sup"] = u + s
            out["cs"] += switches(p)
    return out


def free_port(lo: int, hi: int) -> int:
    ports = list(range(lo, hi))
    random.shuffle(ports)
    for p in ports:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p))
            except OSError:
                continue
            return p
    raise SystemExit(f"no free port in {lo}-{hi}")


@dataclass
class Target:
    name: str
    pid: int
    port: int
    maildir: Path
    stop: list[list[str]]
    #: leave earlier rounds' messages in the Maildir (``--keep-mail``, or ``-keep`` on it)
    keep: bool = False
    #: a mailsuite server: its supervisor (the first process) is shown apart
    supervised: bool = True


def start_mailsuite(label: str, spec: str, work: Path, tree_dir: str | None) -> Target:
    limits = "off" if spec.endswith("-nolimits") else "default"
    spec = spec.removesuffix("-nolimits")
    base = spec.removesuffix("-noauth")
    extra = ""
    if base != spec:
        extra = "[mail_auth]\nspf = false\ndkim = false\ndmarc = false\narc = false"
    # PYTHONPATH always: the installed package may be another checkout's
    env = dict(os.environ, PYTHONPATH=tree_dir or str(HERE.parent))
    target = [sys.executable, str(HERE / "mailsuite_target.py")]
    out = subprocess.run(
        [
            *target,
            "start",
            "--dir",
            str(work / label),
            "--workers",
            base.removeprefix("w"),
            "--extra-toml",
            extra,
            "--connection-limits",
            limits,
        ],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    values = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    v = {k: shlex.split(x)[0] if x else "" for k, x in values.items()}
    return Target(
        label,
        int(v["MS_PID"]),
        int(v["MS_SMTP_PORT"]),
        Path(v["MS_MAILDIR_FMT"].format(user="bench")),
        [[*target, "stop", "--dir", str(work / label)]],
    )


def start_postfix(label: str, work: Path) -> Target:
    """Postfix through the shared harness's peers.sh, own RUN directory and port."""
    run = work / label
    run.mkdir()
    env = dict(os.environ, RUN=str(run), PORT_POSTFIX_SMTP=str(free_port(10500, 10750)))
    peers = str(SHARED_BENCH / "peers.sh")
    stop = [
        "env",
        f"RUN={run}",
        f"PORT_POSTFIX_SMTP={env['PORT_POSTFIX_SMTP']}",
        peers,
        "stop",
        "postfix",
    ]
    subprocess.run(
        [peers, "start", "postfix"],
        env=env,
        cwd=SHARED_BENCH,
        check=True,
        timeout=120,
        capture_output=True,
    )
    pid = int((run / "postfix" / "pid").read_text())
    port = int(env["PORT_POSTFIX_SMTP"])
    return Target(label, pid, port, run / "postfix" / "Maildir", [stop], supervised=False)


def count(maildir: Path) -> int:
    return sum(1 for sub in ("new", "cur") for _ in os.scandir(maildir / sub))


def clear(maildir: Path) -> None:
    for sub in ("new", "cur"):
        for entry in os.scandir(maildir / sub):
            os.unlink(entry.path)  # noqa: PTH108 (scandir gives strings)


def client_cmd(t: Target, a: argparse.Namespace, msgs: int) -> list[str]:
    cmd = [a.smtp_source, "-s", str(a.sessions), "-m", str(msgs), "-l", str(a.size)]
    cmd += ["-f", "load@example.org", "-t", "bench@example.test", "-M", "client.example.org"]
    return [*cmd, f"127.0.0.1:{t.port}"]


def wait_for(maildir: Path, goal: int) -> None:
    deadline = time.monotonic() + 120
    while count(maildir) < goal and time.monotonic() < deadline:
        time.sleep(0.02)


def one_round(t: Target, a: argparse.Namespace) -> tuple[float, dict[str, float]]:
    if not t.keep:
        clear(t.maildir)
    goal = count(t.maildir) + a.msgs
    before = snapshot(t.pid)
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(client_cmd(t, a, a.msgs), check=True, capture_output=True, timeout=600)
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    wait_for(t.maildir, goal)
    took = time.perf_counter() - t0
    time.sleep(0.3)  # log lines still in flight to the supervisor, Postfix's last steps
    after = snapshot(t.pid)
    per = {k: (after[k] - before[k]) / a.msgs * 1e6 for k in ("user", "sys")}
    per["server"] = per["user"] + per["sys"]
    if t.supervised:
        per["sup"] = (after["sup"] - before["sup"]) / a.msgs * 1e6
    per["c.user"] = (ru1.ru_utime - ru0.ru_utime) / a.msgs * 1e6
    per["c.sys"] = (ru1.ru_stime - ru0.ru_stime) / a.msgs * 1e6
    per["all"] = per["server"] + per["c.user"] + per["c.sys"]
    per["cs"] = (after["cs"] - before["cs"]) / a.msgs  # a count per message, not us
    return a.msgs / took, per


def strace_summary(path: Path) -> tuple[int, list[tuple[str, int]]]:
    """Total calls and (name, calls) of an ``strace -c`` table."""
    total, calls = 0, []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
            n = int(parts[3])
            calls.append((parts[-1], n))
        elif parts and parts[-1] == "total" and len(parts) >= 4:
            total = int(parts[3])
    calls.sort(key=lambda c: -c[1])
    return total, calls


def strace_round(t: Target, a: argparse.Namespace, work: Path) -> None:
    n = a.strace_msgs
    if not t.keep:
        clear(t.maildir)
    goal = count(t.maildir) + n
    srv_out, cli_out = work / f"{t.name}.strace", work / f"{t.name}.client.strace"
    attach = [x for p in tree(t.pid) for x in ("-p", str(p))]
    tracer = subprocess.Popen(
        ["strace", "-c", "-f", "-o", str(srv_out), *attach], stderr=subprocess.DEVNULL
    )
    try:
        time.sleep(1.0)  # attached
        cmd = ["strace", "-c", "-f", "-o", str(cli_out), *client_cmd(t, a, n)]
        subprocess.run(cmd, check=True, capture_output=True, timeout=600)
        wait_for(t.maildir, goal)
        time.sleep(0.5)
    finally:
        tracer.send_signal(2)
        tracer.wait(timeout=30)
    for who, path in (("server", srv_out), ("client", cli_out)):
        total, calls = strace_summary(path)
        top = ", ".join(f"{name} {c / n:.1f}" for name, c in calls[: a.strace_top])
        print(f"  {t.name} {who}: {total / n:.1f} syscalls/msg ({top})", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--target", action="append", required=True)
    ap.add_argument("--msgs", type=int, default=1000)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--keep-mail", action="store_true", help="no clearing between rounds")
    ap.add_argument("--strace-msgs", type=int, default=0, help="a round under strace -c")
    ap.add_argument("--strace-top", type=int, default=12)
    ap.add_argument("--smtp-source", default=os.environ.get("SMTP_SOURCE", "/usr/sbin/smtp-source"))
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    a = ap.parse_args()
    # world-traversable: Postfix's virtual(8) delivers as the benchmark uid into it
    # on TMPDIR_BASE, as bench/smtp.sh: a file system of one's choice (journaled or not)
    base = os.environ.get("TMPDIR_BASE", "/var/tmp")
    work = Path(tempfile.mkdtemp(prefix="mailsuite-smtp-cpu.", dir=base))
    work.chmod(0o755)
    targets: list[Target] = []
    try:
        for spec in a.target:
            head, _, tree_dir = spec.partition("=")  # (TREE may be a PYTHONPATH with colons)
            label, _, kind = head.rpartition(":")
            spec_kind = kind.removesuffix("-keep")
            if spec_kind == "postfix":
                target = start_postfix(label or kind, work)
            else:
                target = start_mailsuite(label or kind, spec_kind, work, tree_dir or None)
            target.keep = a.keep_mail or spec_kind != kind
            targets.append(target)
        time.sleep(3)  # workers import and adopt the sockets
        rates: dict[str, list[float]] = {t.name: [] for t in targets}
        cpu: dict[str, dict[str, list[float]]] = {t.name: {} for t in targets}
        for r in range(a.rounds):
            print(f"round {r + 1}/{a.rounds}, load {os.getloadavg()[:3]}", flush=True)
            for i in range(len(targets)):
                t = targets[(i + r) % len(targets)]
                rate, per = one_round(t, a)
                rates[t.name].append(rate)
                for k, v in per.items():
                    cpu[t.name].setdefault(k, []).append(v)
                shown = " ".join(f"{k} {v:.0f}" for k, v in per.items())
                print(f"  {t.name}: {rate:.0f} msgs/s; us/msg {shown}", flush=True)
        print(f"median of {a.rounds} (spread), load {os.getloadavg()[:3]}:")
        for t in targets:
            parts = [f"{statistics.median(rates[t.name]):.0f} msgs/s"]
            for k, vs in cpu[t.name].items():
                parts.append(f"{k} {statistics.median(vs):.0f} ({min(vs):.0f}-{max(vs):.0f})")
            print(f"  {t.name}: " + "; ".join(parts) + " us/msg")
        if a.strace_msgs:
            print(f"strace -c -f, one round of {a.strace_msgs} per target:")
            for t in targets:
                strace_round(t, a, work)
    finally:
        for t in targets:
            for cmd in t.stop:
                subprocess.run(cmd, check=False, cwd=SHARED_BENCH, capture_output=True, timeout=120)
        if not a.keep:
            time.sleep(1)
            subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    main()
