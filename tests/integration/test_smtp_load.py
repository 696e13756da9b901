"""Concurrency and crash safety of the receiving service: nothing lost, nothing doubled."""

from __future__ import annotations

import re
import smtplib
import threading
from pathlib import Path

from tests.harness import Server, wait_until

ID = re.compile(rb"^X-Test-Id: (\S+)$", re.M)


def ids_in(srv: Server, user: str) -> list[bytes]:
    out = []
    for msg in srv.messages(user):
        m = ID.search(msg)
        assert m, msg[:200]
        assert msg.endswith(b"end of message\n"), "a truncated message reached new/"
        out.append(m.group(1))
    return out


def message(tag: str) -> bytes:
    return (
        f"Subject: load {tag}\r\nX-Test-Id: {tag}\r\n\r\n".encode()
        + b"line of text for the body\r\n" * 100
        + b"end of message\r\n"
    )


def test_50_sessions_20_messages_each(tmp_path: Path) -> None:
    # A throughput test, not a limits test (tests/integration/test_connection_limits.py): the
    # harness's port probe can still count against the 50-per-address default when the 50
    # clients arrive, so the per-address limit is off here.
    srv = Server(tmp_path, extra_toml="[smtp]\nmax_connections_per_ip = 0\n")
    srv.add_user("load@example.test")
    errors: list[BaseException] = []
    with srv:
        port = srv.port("smtp")

        def client(c: int) -> None:
            try:
                with smtplib.SMTP("127.0.0.1", port, timeout=60) as s:
                    for i in range(20):
                        s.sendmail("s@remote.test", ["load@example.test"], message(f"{c}-{i}"))
            except BaseException as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=client, args=(c,)) for c in range(50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors[:3]
        got = ids_in(srv, "load@example.test")
    assert len(got) == 1000
    assert sorted(got) == sorted(f"{c}-{i}".encode() for c in range(50) for i in range(20))


def test_kill_9_loses_no_acknowledged_message(tmp_path: Path) -> None:
    srv = Server(tmp_path)
    srv.add_user("crash@example.test")
    acked: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()
    srv.start()
    port = srv.port("smtp")

    def client(c: int) -> None:
        i = 0
        while not stop.is_set() and i < 500:
            tag = f"{c}-{i}"
            i += 1
            try:
                with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
                    s.sendmail("s@remote.test", ["crash@example.test"], message(tag))
            except (OSError, smtplib.SMTPException):
                return  # the server died under us: this message was not acknowledged
            with lock:
                acked.append(tag)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(8)]
    for t in threads:
        t.start()
    wait_until(lambda: len(acked) >= 150, 30, "150 acknowledged messages", interval=0.005)
    srv.kill9()  # in the middle of the load
    stop.set()
    for t in threads:
        t.join(30)
    assert len(acked) >= 50, "the load did not get going"
    got = set(ids_in(srv, "crash@example.test"))
    missing = [a for a in acked if a.encode() not in got]
    assert not missing, f"{len(missing)} acknowledged messages lost, e.g. {missing[:5]}"
    # leftovers of interrupted transactions stay in tmp/ only, never in new/
    # and the server starts again on the same data
    srv.start()
    with smtplib.SMTP("127.0.0.1", port) as s:
        s.sendmail("s@remote.test", ["crash@example.test"], message("after-restart"))
    srv.stop()
    assert b"after-restart" in ids_in(srv, "crash@example.test")


def test_large_message_is_streamed_not_buffered(tmp_path: Path) -> None:
    """A 50 MB message must not grow the server by 50 MB (it is streamed to disk)."""
    srv = Server(tmp_path)
    srv.add_user("big@example.test")
    with srv:
        assert srv.proc is not None

        def rss_kib() -> int:
            status = Path(f"/proc/{srv.proc.pid}/status").read_text()
            return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]

        # warm up so imports and thread pool are already counted
        with smtplib.SMTP("127.0.0.1", srv.port("smtp")) as s:
            s.sendmail("s@remote.test", ["big@example.test"], message("warm"))
        before = rss_kib()
        body = b"Subject: big\r\nX-Test-Id: big\r\n\r\n" + (b"z" * 998 + b"\r\n") * 50_000
        body += b"end of message\r\n"
        with smtplib.SMTP("127.0.0.1", srv.port("smtp"), timeout=120) as s:
            s.sendmail("s@remote.test", ["big@example.test"], body)
        grew = rss_kib() - before
    sizes = [len(m) for m in srv.messages("big@example.test")]
    assert max(sizes) > 49_000_000
    assert grew < 20 * 1024, f"server grew by {grew} KiB for a 50 MB message"
    assert srv.maildir("big@example.test").exists()
