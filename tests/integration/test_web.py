"""The web listener of the real server: /healthz both ways, /metrics moving with traffic, client
autoconfiguration read the way Thunderbird and Outlook read it, bad requests, JSON logs."""

from __future__ import annotations

import http.client
import imaplib
import json
import os
import smtplib
import socket
import ssl
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import endpoints

from mailsuite.service import _Listener
from mailsuite.web.health import HealthCheck
from tests.harness import PASSWORD, Server, ServerFactory, wait_until
from tests.reactor_thread import in_reactor

CLIENT_SERVICES = ("smtp", "submission", "submissions", "imap", "imaps", "pop3", "pop3s", "web")
TB = "{http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a}"
OUTLOOK_REQUEST = (
    '<?xml version="1.0" encoding="utf-8"?>'
    '<Autodiscover xmlns="http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006">'
    "<Request><EMailAddress>{address}</EMailAddress>"
    "<AcceptableResponseSchema>"
    "http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a"
    "</AcceptableResponseSchema></Request></Autodiscover>"
)


def request(
    srv: Server, method: str, path: str, body: bytes | None = None, headers: dict | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port("web"), timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def metrics(srv: Server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, headers, body = request(srv, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(m: dict, name: str, **labels: str) -> float:
    return m[(name, tuple(sorted(labels.items())))]


def no_traceback(srv: Server) -> None:
    assert "Traceback" not in srv.log.read_text(errors="replace")


# -- /healthz ---------------------------------------------------------------------------------


def test_healthz_is_ok_and_names_a_data_folder_that_takes_no_writes(tmp_path: Path) -> None:
    with Server(tmp_path, services=("smtp", "web")) as srv:
        assert request(srv, "GET", "/healthz")[::2] == (200, b"ok\n")
        assert request(srv, "HEAD", "/healthz")[::2] == (200, b"")
        mail = srv.data / "mail"
        # A folder that cannot take files (root ignores permissions, so not chmod): the
        # mail folder replaced by a file, as when a disk is not mounted where it should be.
        mail.rename(srv.data / "mail.away")
        mail.write_text("not a folder")
        status, headers, body = request(srv, "GET", "/healthz")
        assert status == 503, body
        assert headers["content-type"] == "text/plain; charset=utf-8"
        assert body.decode() == f"{mail} is not writable: Not a directory\n"
        mail.unlink()
        (srv.data / "mail.away").rename(mail)
        assert request(srv, "GET", "/healthz")[::2] == (200, b"ok\n")
        if os.geteuid() != 0:  # an unwritable data folder, where permissions apply
            srv.data.chmod(0o500)
            try:
                status, _, body = request(srv, "GET", "/healthz")
                assert status == 503 and b"Permission denied" in body
            finally:
                srv.data.chmod(0o700)
        assert not list(srv.data.glob(".healthz-*")) and not list(mail.glob(".healthz-*"))
        no_traceback(srv)


def test_health_names_a_listener_that_stopped_listening(tmp_path: Path, reactor: Any) -> None:
    listener = _Listener(
        endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"),
        _NoProtocols(),
        "[listen] imap 'tcp:0'",
        "test.toml",
    )
    check = HealthCheck(lambda: [listener.problem()], [tmp_path], reactor)
    assert in_reactor(reactor, check.problems) == ["[listen] imap 'tcp:0': not listening yet"]
    in_reactor(reactor, listener.privilegedStartService)
    assert in_reactor(reactor, check.problems) == []
    in_reactor(reactor, listener.port.stopListening)
    assert in_reactor(reactor, check.problems) == ["[listen] imap 'tcp:0': not listening"]


class _NoProtocols:
    def doStart(self) -> None:  # noqa: N802
        pass

    def doStop(self) -> None:  # noqa: N802
        pass

    def buildProtocol(self, addr: object) -> None:
        return None


# -- /metrics ---------------------------------------------------------------------------------


def test_metrics_move_with_connections_tls_handshakes_and_the_queue(tmp_path: Path) -> None:
    dead_dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dead_dns.bind(("127.0.0.1", 0))  # a name server that never answers: remote mail waits
    extra = (
        '[relay]\ntrusted_networks = ["127.0.0.1/32"]\n'
        f'[dns]\nnameservers = ["127.0.0.1:{dead_dns.getsockname()[1]}"]\n'
    )
    try:
        with Server(tmp_path, services=("smtp", "imaps", "web"), extra_toml=extra) as srv:
            # the harness connected once to each port to see it open: a port probe, counted as
            # a connection but not as a failed TLS handshake
            before = metrics(srv)
            smtp_before = value(before, "mailsuite_connections_total", listener="smtp")
            imaps_before = value(before, "mailsuite_connections_total", listener="imaps")
            assert value(before, "mailsuite_connections_open", listener="smtp") == 0
            assert value(before, "mailsuite_queue_messages") == 0
            assert value(before, "mailsuite_queue_oldest_age_seconds") == 0
            assert value(before, "mailsuite_tls_handshakes_total", result="ok") == 0
            assert value(before, "mailsuite_tls_handshakes_total", result="failed") == 0
            assert value(before, "mailsuite_process_resident_memory_bytes") > 0
            assert all(name.startswith("mailsuite_") for name, _ in before)

            smtp = smtplib.SMTP("127.0.0.1", srv.port("smtp"), timeout=10)
            smtp.ehlo("client.example.org")
            during = metrics(srv)
            assert value(during, "mailsuite_connections_total", listener="smtp") == smtp_before + 1
            assert value(during, "mailsuite_connections_open", listener="smtp") == 1
            smtp.sendmail("a@example.test", ["someone@remote.example"], b"Subject: x\r\n\r\nhi\r\n")
            smtp.quit()
            wait_until(
                lambda: value(metrics(srv), "mailsuite_connections_open", listener="smtp") == 0,
                what="no open SMTP connection in the metrics",
            )
            after = metrics(srv)
            assert value(after, "mailsuite_queue_messages") == 1
            assert value(after, "mailsuite_queue_oldest_age_seconds") > 0

            unverified = ssl.create_default_context()
            unverified.check_hostname = False
            unverified.verify_mode = ssl.CERT_NONE
            with (
                socket.create_connection(("127.0.0.1", srv.port("imaps"))) as raw,
                unverified.wrap_socket(raw) as tls,
            ):
                tls.recv(100)  # the greeting: the handshake is done on both sides
            strict = ssl.create_default_context()  # rejects the self-signed certificate
            with (
                pytest.raises(ssl.SSLCertVerificationError),
                socket.create_connection(("127.0.0.1", srv.port("imaps"))) as raw,
            ):
                strict.wrap_socket(raw, server_hostname="mx.example.test")
            wait_until(
                lambda: value(metrics(srv), "mailsuite_tls_handshakes_total", result="failed") == 1,
                what="the failed handshake in the metrics",
            )
            final = metrics(srv)
            assert value(final, "mailsuite_tls_handshakes_total", result="ok") == 1
            assert value(final, "mailsuite_connections_total", listener="imaps") == imaps_before + 2
            assert value(final, "mailsuite_connections_total", listener="web") >= 5
            no_traceback(srv)
            srv.kill9()  # not SIGTERM: that waits for the delivery stuck on the silent DNS
    finally:
        dead_dns.close()


def test_reactor_lag_is_exported_and_its_probe_ticks(every_service: Server) -> None:
    """The lag probe runs in the real server: the gauge is there and the histogram of tick
    delays grows between two scrapes (what the stall figures of bench/ are read from)."""
    first = metrics(every_service)
    assert value(first, "mailsuite_reactor_lag_seconds") >= 0
    # the held part of a lag (its wait for a CPU taken out) is never more than the lag
    held = value(first, "mailsuite_reactor_held_seconds")
    assert 0 <= held <= value(first, "mailsuite_reactor_lag_seconds")
    ticks = value(first, "mailsuite_reactor_tick_lag_seconds_count")
    wait_until(
        lambda: (
            value(metrics(every_service), "mailsuite_reactor_tick_lag_seconds_count") > ticks + 10
        ),
        what="ten more ticks of the reactor lag probe",
    )
    later = metrics(every_service)
    assert value(later, "mailsuite_reactor_tick_lag_seconds_bucket", le="+Inf") == value(
        later, "mailsuite_reactor_tick_lag_seconds_count"
    )


def test_an_idle_server_slows_its_lag_probe_down(every_service: Server) -> None:
    """An idle server's probe ticks once a second, not 100 times (each wake-up cost ~170 us
    of CPU: 60 ms a second for an idle server with two workers, 2 ms without the probe);
    an I/O event (the scrape; with workers, the log lines it sends the supervisor) brings the
    10 ms rhythm back for a second.  Over 6 s after a scrape each woken probe ticks ~100 + 5
    times, a fast one 600 (the histogram adds up every process: the workers and their
    supervisor)."""
    processes = every_service.workers() + 1 if every_service.workers() > 1 else 1
    series = "mailsuite_reactor_tick_lag_seconds_count"
    before = value(metrics(every_service), series)
    time.sleep(6)
    ticks = value(metrics(every_service), series) - before
    assert ticks < 150 * processes, f"{ticks:.0f} ticks in 6 s of idle ({processes} processes)"


# -- autoconfiguration ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def every_service(module_servers: ServerFactory) -> Server:
    return module_servers(
        CLIENT_SERVICES,
        domains=("example.test", "example.org"),
        extra_toml="[web]\npublic_ports = { submission = 587 }\n",
    )


def _servers(provider: ET.Element, tag: str) -> list[tuple[str, str, int, str, str, str]]:
    out = []
    for el in provider.findall(tag):
        out.append(
            (
                el.get("type") or "",
                el.findtext("hostname") or "",
                int(el.findtext("port") or 0),
                el.findtext("socketType") or "",
                el.findtext("username") or "",
                el.findtext("authentication") or "",
            )
        )
    return out


@pytest.mark.parametrize(
    "path", ["/mail/config-v1.1.xml", "/.well-known/autoconfig/mail/config-v1.1.xml"]
)
def test_thunderbird_autoconfig(every_service: Server, path: str) -> None:
    srv = every_service
    status, headers, body = request(srv, "GET", path + "?emailaddress=alice%40example.org")
    assert status == 200 and headers["content-type"] == "application/xml; charset=utf-8"
    root = ET.fromstring(body)
    assert root.tag == "clientConfig" and root.get("version") == "1.1"
    (provider,) = root.findall("emailProvider")
    assert provider.get("id") == "example.org"
    assert [d.text for d in provider.findall("domain")] == ["example.org"]
    assert provider.findtext("displayName") and provider.findtext("displayShortName")
    host, user, auth = "mx.example.test", "%EMAILADDRESS%", "password-cleartext"
    assert _servers(provider, "incomingServer") == [
        ("imap", host, srv.port("imaps"), "SSL", user, auth),
        ("imap", host, srv.port("imap"), "STARTTLS", user, auth),
        ("pop3", host, srv.port("pop3s"), "SSL", user, auth),
        ("pop3", host, srv.port("pop3"), "STARTTLS", user, auth),
    ]
    assert _servers(provider, "outgoingServer") == [
        ("smtp", host, srv.port("submissions"), "SSL", user, auth),
        ("smtp", host, 587, "STARTTLS", user, auth),  # [web] public_ports
    ]
    assert str(srv.port("smtp")).encode() not in body  # the MX port takes no logins
    # without an address: every local domain
    status, _, body = request(srv, "GET", path)
    provider = ET.fromstring(body).find("emailProvider")
    assert status == 200 and provider is not None
    assert [d.text for d in provider.findall("domain")] == ["example.org", "example.test"]
    for bad in ("?emailaddress=someone%40elsewhere.example", "?emailaddress=no-at-sign"):
        status, _, body = request(srv, "GET", path + bad)
        assert (status, body) == (404, b"no mail service here for that address\n")


def test_outlook_autodiscover(every_service: Server) -> None:
    srv = every_service
    body = OUTLOOK_REQUEST.format(address="Alice@example.test").encode()
    status, headers, answer = request(
        srv, "POST", "/autodiscover/autodiscover.xml", body, {"Content-Type": "text/xml"}
    )
    assert status == 200 and headers["content-type"] == "application/xml; charset=utf-8"
    root = ET.fromstring(answer)
    assert (
        root.tag
        == "{http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006}Autodiscover"
    )
    account = root.find(f"{TB}Response/{TB}Account")
    assert account is not None
    assert account.findtext(f"{TB}AccountType") == "email"
    assert account.findtext(f"{TB}Action") == "settings"
    protocols = {
        p.findtext(f"{TB}Type"): (
            p.findtext(f"{TB}Server"),
            int(p.findtext(f"{TB}Port") or 0),
            p.findtext(f"{TB}LoginName"),
            p.findtext(f"{TB}Encryption"),
        )
        for p in account.findall(f"{TB}Protocol")
    }
    assert protocols == {
        "IMAP": ("mx.example.test", srv.port("imaps"), "Alice@example.test", "SSL"),
        "POP3": ("mx.example.test", srv.port("pop3s"), "Alice@example.test", "SSL"),
        "SMTP": ("mx.example.test", srv.port("submissions"), "Alice@example.test", "SSL"),
    }
    same = request(srv, "POST", "/Autodiscover/Autodiscover.xml", body)
    assert same[0] == 200 and same[2] == answer


def test_bad_web_requests_get_short_answers_and_no_traceback(every_service: Server) -> None:
    srv = every_service
    cases = [
        ("GET", "/autodiscover/autodiscover.xml", None, 405, b"method not allowed\n"),
        (
            "POST",
            "/autodiscover/autodiscover.xml",
            b"not xml",
            400,
            b"not an XML autodiscover request\n",
        ),
        (
            "POST",
            "/autodiscover/autodiscover.xml",
            b"<a/>",
            400,
            b"no Request/EMailAddress in the request\n",
        ),
        (
            "POST",
            "/autodiscover/autodiscover.xml",
            b'<!DOCTYPE a [<!ENTITY x "y">]><a>&x;</a>',
            400,
            b"document type declarations not accepted\n",
        ),
        (
            "POST",
            "/autodiscover/autodiscover.xml",
            OUTLOOK_REQUEST.format(address="x@elsewhere.example").encode(),
            404,
            b"no mail service here for that address\n",
        ),
        ("POST", "/healthz", b"", 405, b"method not allowed\n"),
        ("GET", "/metrics/extra", None, 404, b"not found\n"),
        ("GET", "/../../etc/passwd", None, 404, b"not found\n"),
        ("PUT", "/", b"x", 404, b"not found\n"),
        ("POST", "/autodiscover/autodiscover.xml", b"x" * 70_000, 413, b"request body too large\n"),
    ]
    for method, path, body, status, text in cases:
        got = request(srv, method, path, body)
        assert (got[0], got[2]) == (status, text), (method, path)
    with socket.create_connection(("127.0.0.1", srv.port("web")), timeout=10) as s:
        s.sendall(b"NONSENSE\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 400")
    no_traceback(srv)


# -- structured logs --------------------------------------------------------------------------


def test_json_log_format_writes_one_object_per_line(tmp_path: Path) -> None:
    srv = Server(
        tmp_path, services=("smtp", "imap", "web"), extra_toml="[auth]\nallow_plaintext = true\n"
    )
    srv.config.write_text(
        srv.config.read_text().replace("[server]\n", '[server]\nlog_format = "json"\n', 1)
    )
    srv.add_user("joe@example.test")
    with srv:
        with smtplib.SMTP("127.0.0.1", srv.port("smtp"), timeout=10) as smtp:
            smtp.sendmail("a@example.org", ["joe@example.test"], b"Subject: hi\r\n\r\nbody\r\n")
            smtp.docmd("BOGUS")
        imap = imaplib.IMAP4("127.0.0.1", srv.port("imap"))
        with pytest.raises(imaplib.IMAP4.error):
            imap.login("joe@example.test", "wrong password")
        imap = imaplib.IMAP4("127.0.0.1", srv.port("imap"))
        imap.login("joe@example.test", PASSWORD)
        imap.select("INBOX")
        imap.logout()
        request(srv, "GET", "/nothing-here")
        request(srv, "GET", "/mail/config-v1.1.xml?emailaddress=joe%40example.test")
    lines = [line for line in srv.log.read_text().splitlines() if line]
    assert len(lines) > 5
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    for r in records:
        assert set(r) >= {"time", "level", "system", "namespace", "event", "fields"}, r
        assert r["time"].endswith("Z") and r["level"] in ("debug", "info", "warn", "error")
        assert isinstance(r["fields"], dict)
    web = [r for r in records if r["namespace"] == "mailsuite.web"]
    assert any(r["fields"].get("code") == 404 and "/nothing-here" in r["event"] for r in web)
    assert not any("traceback" in r for r in records)
