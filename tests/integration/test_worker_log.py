"""The server log with ``[server] workers = 2`` (issue 15, mailsuite.loglines): each worker
formats its lines and the supervisor writes them as they come, so every line of both
workers reaches the one log whole (none torn, none interleaved with another, none lost)
under concurrent load, in twistd's text format or as JSON, in the log file (rotated on
SIGUSR1 as twistd does) or on stdout with ``twistd -n``."""

from __future__ import annotations

import json
import re
import signal
import smtplib
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mailsuite.testing.process import mailsuite_argv
from tests.clients import LineClient
from tests.harness import ALICE, Server, ServerFactory, assert_clean_log, wait_until
from tests.integration.test_workers import on_worker
from tests.worker_helpers import worker_pids

#: A delivery's log line in twistd's text format, from worker 0 or 1.
DELIVERED = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[(w[01]) mailsuite\.smtp#info\] "
    r"mx: 127\.0\.0\.1: (\S+) from=<s\d+@remote\.test> to=alice@example\.test "
    r"size=\d+ ip=127\.0\.0\.1$"
)


def two_workers(servers: ServerFactory, server_toml: str = "") -> Server:
    srv = servers(("smtp",), users=(ALICE,), server_toml=f"workers = 2\n{server_toml}")
    wait_until(lambda: len(worker_pids(srv)) == 2, 30, "two workers")
    return srv


def send(port: int, n: int) -> str:
    """One message on a new connection; its queue id (from the 250 reply)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as s:
        s.ehlo()
        s.mail(f"s{n}@remote.test")
        s.rcpt(ALICE)
        code, text = s.data(f"Subject: {n}\r\n\r\n{'x' * 200}\r\n".encode())
    assert code == 250, (code, text)
    return text.decode().rsplit(" ", 1)[1]


def reply(c: LineClient) -> str:
    """The last line of the next (possibly multi-line) SMTP reply."""
    while True:
        line = c.line()
        assert line, "connection closed"
        if line[3:4] != "-":
            return line


def send_on_each_worker(srv: Server, first: int) -> list[str]:
    """One message through each worker (the kernel picks who accepts; this makes sure)."""
    ids = []
    for i, pid in enumerate(worker_pids(srv)):
        c = on_worker(srv.port("smtp"), pid, worker_pids(srv))
        try:
            for command in (
                "EHLO client.test",
                f"MAIL FROM:<s{first + i}@remote.test>",
                f"RCPT TO:<{ALICE}>",
                "DATA",
            ):
                c.send_line(command)
                assert reply(c)[0] in "23", command
            c.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
            answer = reply(c)
            assert answer.startswith("250 "), answer
            ids.append(answer.rsplit(" ", 1)[1])
        finally:
            c.close()
    return ids


def test_every_line_of_both_workers_reaches_the_log_whole(servers: ServerFactory) -> None:
    srv = two_workers(servers)
    ids = send_on_each_worker(srv, 0)
    with ThreadPoolExecutor(12) as pool:
        ids += list(pool.map(lambda n: send(srv.port("smtp"), n), range(2, 242)))
    wait_until(
        lambda: srv.log.read_text().count(" to=alice@example.test ") >= len(ids),
        60,
        "a log line for every message",
    )
    found: dict[str, str] = {}
    for line in srv.log.read_text().splitlines():
        if "mailsuite.smtp#info] mx:" not in line:
            continue
        m = DELIVERED.match(line)
        assert m, f"torn or interleaved line: {line!r}"
        assert m.group(2) not in found, f"line written twice: {line!r}"
        found[m.group(2)] = m.group(1)
    assert sorted(found) == sorted(ids)  # every acknowledged message has its line, once
    assert set(found.values()) == {"w0", "w1"}


def test_sigusr1_rotates_the_log_workers_write_to(servers: ServerFactory) -> None:
    """twistd rotates its log on SIGUSR1; the workers' lines follow into the new file."""
    srv = two_workers(servers)
    before = send_on_each_worker(srv, 0)
    srv.wait_log(before[-1])
    assert srv.proc is not None
    srv.proc.send_signal(signal.SIGUSR1)
    rotated = srv.log.with_name("twistd.log.1")
    wait_until(rotated.exists, 20, "twistd.log.1")
    srv._log_checked = 0  # (the harness's offset was into the file now rotated)
    after = send_on_each_worker(srv, 2)
    for queue_id in after:
        srv.wait_log(queue_id)
    old = rotated.read_text()
    assert all(q in old for q in before)
    assert not any(q in old for q in after)
    new = srv.log.read_text()
    assert {m.group(1) for line in new.splitlines() if (m := DELIVERED.match(line))} == {
        "w0",
        "w1",
    }
    assert_clean_log(old, str(rotated))


def test_json_lines_of_both_workers_name_the_worker(servers: ServerFactory) -> None:
    srv = two_workers(servers, 'log_format = "json"')
    ids = send_on_each_worker(srv, 0)
    ids += [send(srv.port("smtp"), n) for n in range(2, 12)]
    wait_until(
        lambda: all(q in srv.log.read_text() for q in ids), 30, "a log line for every message"
    )
    records = [json.loads(line) for line in srv.log.read_text().splitlines() if line]
    delivered = [r for r in records if "from=<" in r["event"]]
    assert sorted(r["event"].split()[2] for r in delivered) == sorted(ids)
    assert {r["system"] for r in delivered} == {"w0 mailsuite.smtp#info", "w1 mailsuite.smtp#info"}
    assert all(r["namespace"] == "mailsuite.smtp" and r["level"] == "info" for r in delivered)
    assert any(r["system"].startswith("w0 ") and "serving" not in r["event"] for r in records)


def test_twistd_n_shows_the_workers_lines_on_stdout(tmp_path: Path) -> None:
    """Without --logfile, ``twistd -n`` logs to stdout: the workers' lines too."""
    srv = Server(tmp_path, services=("smtp",), server_toml="workers = 2")
    srv.add_user(ALICE)
    proc = subprocess.Popen(
        mailsuite_argv(str(srv.config)),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    srv.proc = proc
    out: list[str] = []
    assert proc.stdout is not None
    stdout = proc.stdout

    def read() -> None:
        for raw in stdout:
            out.append(raw.decode(errors="replace"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        wait_until(lambda: "all 2 workers serving" in "".join(out), 60, "the workers")
        ids = send_on_each_worker(srv, 0)
        wait_until(lambda: all(q in "".join(out) for q in ids), 20, "the workers' lines")
        lines = [line.rstrip("\n") for line in out]
        assert {m.group(1) for line in lines if (m := DELIVERED.match(line))} == {"w0", "w1"}
        assert not srv.log.exists()
    finally:
        srv.proc = None
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        reader.join(10)
    assert_clean_log("".join(out), "twistd -n's stdout")
