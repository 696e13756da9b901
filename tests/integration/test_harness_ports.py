"""The test harness's listening ports (tests/harness.py): taken from below the kernel's
ephemeral range, and a server whose port another program took meanwhile is started again on
new ones instead of failing the test (CI lost a run to "Address already in use": the port
had come from ``bind(0)``, the ephemeral range, which every outgoing connection draws from)."""

from __future__ import annotations

import socket
from pathlib import Path

from tests.harness import _PORTS_TOP, Server, free_port


def test_ports_are_not_from_the_ephemeral_range() -> None:
    ports = {free_port() for _ in range(50)}
    assert len(ports) == 50
    assert all(p < _PORTS_TOP for p in ports)


def test_a_port_taken_after_it_was_picked_gets_the_server_new_ports(tmp_path: Path) -> None:
    srv = Server(tmp_path / "srv", services=("smtp", "pop3"))
    taken = srv.ports["pop3"]
    with socket.socket() as squatter:  # another program takes it before the server starts
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        srv.start()
        try:
            assert srv.ports["pop3"] != taken
            with socket.create_connection(("127.0.0.1", srv.ports["pop3"]), timeout=20) as c:
                assert c.recv(100).startswith(b"+OK")
        finally:
            srv.stop()
