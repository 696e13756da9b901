"""Regression (issue 11): a client that drops the connection while in IDLE left a traceback
in the server log.

The IDLE command waited on a Deferred for the client's DONE; when the connection was lost the
adapter cancelled it, and the session answered the CancelledError like any failed command:
``log.failure("IMAP IDLE failed ...")``, a traceback for every phone that loses its network
in IDLE.  The existing IDLE tests all ended with DONE or LOGOUT.  Now the adapter raises
``ConnectionGone`` into the waiting command, which ends quietly (and stops its poller).
"""

from __future__ import annotations

import socket

from tests.harness import PASSWORD, Server, ServerFactory, wait_until

USER = "idler@example.test"


def greeting(server: Server) -> bytes:
    with socket.create_connection(("127.0.0.1", server.port("imap")), timeout=10) as sock:
        return sock.makefile("rb").readline()


def test_connection_dropped_in_idle_logs_no_traceback(servers: ServerFactory) -> None:
    # one connection at a time: the next one is admitted only once the server has seen the
    # first one close (connectionLost, where the traceback was written)
    server = servers(
        ("imap",),
        users=(USER,),
        extra_toml=("[auth]\nallow_plaintext = true\n[imap]\nmax_connections = 1\n"),
    )
    wait_until(lambda: greeting(server).startswith(b"* OK"), what="a free connection slot")
    sock = socket.create_connection(("127.0.0.1", server.port("imap")), timeout=10)
    reader = sock.makefile("rb")
    assert reader.readline().startswith(b"* OK")
    sock.sendall(f'a1 LOGIN {USER} "{PASSWORD}"\r\na2 SELECT INBOX\r\na3 IDLE\r\n'.encode())
    while not (line := reader.readline()).startswith(b"+ "):
        assert line, "connection closed before IDLE"
    reader.close()
    sock.close()
    wait_until(
        lambda: greeting(server).startswith(b"* OK"),
        what="the server to see the IDLE connection closed",
    )
    server.stop()  # fails on a traceback in the log
