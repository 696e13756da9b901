"""A floor for bench/pop3.py: the least a Python POP3 server can do per command.

One process, one thread, ``select.epoll`` on non-blocking sockets, and per RETR exactly the
system calls mailsuite makes (``recv``; ``openat`` relative to the open folder, one ``read``
of the file's size, ``close``; one ``send``) and the same dot-stuffing code
(:func:`mailsuite.dotstuff.stuff_all`), with no reactor, no protocol layers, no deadlines, no
metrics, no index, no locking and no flags.  It serves the messages of one Maildir's ``cur/``
in name order to any user and password, and knows just what the shared ``pop3_bench.trial``
and the NOOP loop send (USER, PASS, STAT, UIDL, RETR, NOOP, QUIT), one command per segment
as poplib sends them.

It is no server to use: ``bench/pop3.py --floor`` runs it as one more target in the same
rounds, so the CPU per message downloaded of mailsuite can be read against what is left when
everything but the system calls and the stuffing is taken away (what the Python interpreter
and the kernel's loopback TCP cost on that machine at that load).

    python bench/pop3_floor.py PORT MAILDIR
"""

from __future__ import annotations

import os
import select
import socket
import sys
from pathlib import Path

from mailsuite.dotstuff import stuff_all


def serve(port: int, maildir: str) -> None:
    folder = Path(maildir) / "cur"
    names = sorted(p.name for p in folder.iterdir())
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    sizes = [os.stat(n, dir_fd=dir_fd).st_size for n in names]
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(128)
    listener.setblocking(False)
    poller = select.epoll()
    poller.register(listener.fileno(), select.EPOLLIN)
    conns: dict[int, socket.socket] = {}
    uidl = b"".join(b"%d %d\r\n" % (i, i) for i in range(1, len(names) + 1)) + b".\r\n"
    stat = b"+OK %d %d\r\n" % (len(names), sum(sizes))
    while True:
        for fd, _event in poller.poll():
            if fd == listener.fileno():
                try:
                    conn, _ = listener.accept()
                except BlockingIOError:
                    continue
                conn.setblocking(False)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn.send(b"+OK floor ready\r\n")
                conns[conn.fileno()] = conn
                poller.register(conn.fileno(), select.EPOLLIN)
                continue
            conn = conns[fd]
            try:
                line = conn.recv(65536)
            except OSError:
                line = b""
            if not line:
                poller.unregister(fd)
                del conns[fd]
                conn.close()
                continue
            word, _, arg = line.rstrip(b"\r\n").partition(b" ")
            word = word.upper()
            if word == b"RETR":
                n = int(arg)
                file = os.open(names[n - 1], os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
                try:
                    data = os.read(file, sizes[n - 1] + 1)
                finally:
                    os.close(file)
                conn.send(stuff_all(data, head=b"+OK %d octets\r\n" % len(data)))
            elif word == b"STAT":
                conn.send(stat)
            elif word == b"UIDL":
                conn.send(b"+OK\r\n" + uidl)
            elif word == b"QUIT":
                conn.send(b"+OK bye\r\n")
                poller.unregister(fd)
                del conns[fd]
                conn.close()
            else:  # USER, PASS, NOOP
                conn.send(b"+OK\r\n")


if __name__ == "__main__":
    serve(int(sys.argv[1]), sys.argv[2])
