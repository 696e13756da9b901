"""Which worker process serves a connection (``[server] workers`` > 1), read from Linux /proc:
the server's side of a TCP connection is the /proc/net/tcp row whose remote port is the
client's local port; its inode names the socket in the owning process's /proc/PID/fd."""

from __future__ import annotations

import socket
from pathlib import Path

from tests.harness import Server


def worker_pids(server: Server) -> list[int]:
    """The live worker processes of ``server`` (children of its twistd process)."""
    assert server.proc is not None
    parent = server.proc.pid
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        state = stat.rsplit(")", 1)[1].split()[0]
        if ppid == parent and b"mailsuite.worker" in cmdline and state != "Z":
            out.append(int(entry.name))
    return sorted(out)


def _server_side_inode(client: socket.socket) -> str | None:
    local_port = client.getsockname()[1]
    server_port = client.getpeername()[1]
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if (
                int(fields[1].rsplit(":", 1)[1], 16) == server_port
                and int(fields[2].rsplit(":", 1)[1], 16) == local_port
            ):
                return fields[9]
    return None


def owner(client: socket.socket, pids: list[int]) -> int | None:
    """Which of ``pids`` holds the server side of ``client``'s connection (None: none yet,
    e.g. still waiting in the listen queue)."""
    inode = _server_side_inode(client)
    if inode is None or inode == "0":
        return None
    target = f"socket:[{inode}]"
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            names = [p.name for p in Path(fd_dir).iterdir()]
        except OSError:
            continue
        for name in names:
            try:
                if str(Path(fd_dir, name).readlink()) == target:
                    return pid
            except OSError:
                continue
    return None
