"""A recording, scriptable SMTP server for tests (plays the remote MX), on a line receiver.

Not a mail server: it records what clients send and answers what the script says. Script keys
(all optional; a dict, or JSON for the subprocess)::

    {
      "greeting": [554, "5.7.1 go away"],      # instead of 220 (any non-2xx then waits for QUIT)
      "ehlo": false,                           # answer EHLO with 502 so the client must HELO
      "extensions": ["PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES"],   # this is the default
      "size": 1000,                            # advertise SIZE 1000 and enforce it at MAIL
      "smtputf8": true,                        # advertise SMTPUTF8
      "starttls": {"cert": "server.pem", "key": "server.key"},   # PEM files; advertise STARTTLS
      "auth": {"user": "secret"},              # advertise AUTH PLAIN LOGIN (after TLS only)
      "mail": [451, "4.3.0 try later"],        # reply to every MAIL
      "rcpt": {"bad@example.test": [550, "5.1.1 no such user"]},
      "max_rcpts": 2,                          # 452 4.5.3 for each RCPT after 2 accepted
      "data": [554, "5.7.1 no DATA for you"],  # reply to DATA instead of 354
      "data_end": [452, "4.3.1 full"],         # reply after the final dot instead of 250
      "silent": ["greeting"]                   # never answer at: greeting, ehlo, mail, rcpt,
    }                                          #   data, data_end

In a test reactor: ``mx = RecordingSMTPServer(script, record_dir=None)``,
``port = mx.start(reactor, "127.0.0.2", 0)``; read ``mx.transactions``; ``mx.stop()``.
As a subprocess: ``python -m mailsuite.testing.mx --listen 127.0.0.2:2525 --record DIR
[--script JSON_OR_FILE]`` prints ``ready PORT``; each transaction is written to DIR as
``NNNN.eml`` (data, CRLF, un-stuffed) and ``NNNN.json`` (envelope).
"""

from __future__ import annotations

import argparse
import base64
import json
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet import defer, protocol

from mailsuite.transport import LineReceiver, Transport, transport_of

__all__ = ["RecordingSMTPServer", "Transaction", "spawn_mx_server"]

DEFAULT_EXTENSIONS = ["PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES"]


@dataclass
class Transaction:
    """One completed MAIL..final-dot transaction as the server saw it."""

    helo: str
    mail_from: str
    mail_params: list[str]
    rcpts: list[str]  # accepted recipients
    refused_rcpts: list[str]
    data: bytes  # un-stuffed, CRLF line ends, without the terminating dot line
    tls: bool
    auth_user: str | None
    peer: str


@dataclass
class _Session:
    helo: str = ""
    tls: bool = False
    auth_user: str | None = None
    mail_from: str | None = None
    mail_params: list[str] = field(default_factory=list)
    rcpts: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)


class _MXProtocol(LineReceiver):
    delimiter = b"\r\n"
    MAX_LENGTH = 1 << 20

    def __init__(self, server: RecordingSMTPServer) -> None:
        self.server = server
        self.script = server.script
        self.s = _Session()
        self.data: list[bytes] | None = None
        self.auth_state: str | None = None
        self.auth_login_user = ""

    @property
    def _tx(self) -> Transport:
        return transport_of(self)

    def reply(self, code: int, text: str, stage: str | None = None) -> None:
        if stage is not None and stage in self.script.get("silent", []):
            return
        lines = text.split("\n")
        for line in lines[:-1]:
            self._tx.write(f"{code}-{line}\r\n".encode())
        self._tx.write(f"{code} {lines[-1]}\r\n".encode())

    def scripted(self, key: str, default: tuple[int, str], stage: str) -> int:
        code, text = self.script.get(key) or default
        self.reply(int(code), text, stage)
        return int(code)

    def connectionMade(self) -> None:
        self.server.connections += 1
        self.scripted("greeting", (220, "mx.test ESMTP recorder"), "greeting")

    def lineReceived(self, line: bytes) -> None:
        if self.data is not None:
            if line == b".":
                self._end_data()
            else:
                self.data.append(line[1:] if line.startswith(b".") else line)
            return
        if self.auth_state is not None:
            self.server.commands.append("(auth response)")
            self._auth_continue(line)
            return
        text = line.decode("utf-8", "replace")
        verb, _, arg = text.partition(" ")
        verb = verb.upper()
        shown = f"AUTH {arg.split(' ')[0]} ****" if verb == "AUTH" else text
        self.server.commands.append(shown)
        getattr(self, "do_" + verb, self.do_unknown)(arg)

    def do_unknown(self, arg: str) -> None:
        self.reply(500, "5.5.2 command not recognized")

    def do_NOOP(self, arg: str) -> None:
        self.reply(250, "2.0.0 ok")

    def do_RSET(self, arg: str) -> None:
        self.s = _Session(helo=self.s.helo, tls=self.s.tls, auth_user=self.s.auth_user)
        self.reply(250, "2.0.0 ok")

    def do_QUIT(self, arg: str) -> None:
        self.reply(221, "2.0.0 bye")
        self._tx.loseConnection()

    def do_HELO(self, arg: str) -> None:
        self.s.helo = arg
        self.reply(250, "mx.test", "ehlo")

    def do_EHLO(self, arg: str) -> None:
        if self.script.get("ehlo", True) is False:
            self.reply(502, "5.5.1 EHLO not implemented")
            return
        self.s.helo = arg
        lines = ["mx.test hello " + arg, *self.script.get("extensions", DEFAULT_EXTENSIONS)]
        if "size" in self.script:
            lines.append(f"SIZE {self.script['size']}")
        if self.script.get("smtputf8"):
            lines.append("SMTPUTF8")
        if self.server.tls_context is not None and not self.s.tls:
            lines.append("STARTTLS")
        if self.script.get("auth") and self.s.tls:
            lines.append("AUTH PLAIN LOGIN")
        self.reply(250, "\n".join(lines), "ehlo")

    def do_STARTTLS(self, arg: str) -> None:
        if self.server.tls_context is None or self.s.tls:
            self.reply(502, "5.5.1 no STARTTLS")
            return
        self.reply(220, "2.0.0 go ahead")
        self.clearLineBuffer()  # RFC 3207 4.2: nothing pipelined before TLS is kept
        self._tx.startTLS(self.server.tls_context)
        self.s = _Session(tls=True)

    def do_AUTH(self, arg: str) -> None:
        users = self.script.get("auth") or {}
        if not users or not self.s.tls:
            self.reply(503, "5.5.1 AUTH not available")
            return
        mech, _, initial = arg.partition(" ")
        mech = mech.upper()
        if mech == "PLAIN":
            if initial:
                self._auth_plain(initial.encode())
            else:
                self.auth_state = "plain"
                self.reply(334, "")
        elif mech == "LOGIN":
            self.auth_state = "login-user"
            self.reply(334, "VXNlcm5hbWU6")
        else:
            self.reply(504, "5.5.4 unknown mechanism")

    def _auth_continue(self, line: bytes) -> None:
        state, self.auth_state = self.auth_state, None
        if line == b"*":
            self.reply(501, "5.0.0 cancelled")
        elif state == "plain":
            self._auth_plain(line)
        elif state == "login-user":
            self.auth_login_user = base64.b64decode(line).decode()
            self.auth_state = "login-password"
            self.reply(334, "UGFzc3dvcmQ6")
        else:
            self._auth_check(self.auth_login_user, base64.b64decode(line).decode())

    def _auth_plain(self, token: bytes) -> None:
        try:
            _authz, user, password = base64.b64decode(token).decode().split("\0")
        except ValueError:
            self.reply(501, "5.5.2 bad PLAIN response")
            return
        self._auth_check(user, password)

    def _auth_check(self, user: str, password: str) -> None:
        if (self.script.get("auth") or {}).get(user) == password:
            self.s.auth_user = user
            self.reply(235, "2.7.0 authenticated")
        else:
            self.reply(535, "5.7.8 bad credentials")

    def do_MAIL(self, arg: str) -> None:
        if not arg.upper().startswith("FROM:<"):
            self.reply(501, "5.5.4 syntax")
            return
        addr, _, params = arg[6:].partition(">")
        code = self.scripted("mail", (250, "2.1.0 ok"), "mail") if "mail" in self.script else None
        if code is not None:
            if code < 400:
                self.s.mail_from, self.s.mail_params = addr, params.split()
                self.s.rcpts, self.s.refused = [], []
            return
        for param in params.split():
            key, _, value = param.partition("=")
            if key.upper() == "SIZE" and "size" in self.script and int(value) > self.script["size"]:
                self.reply(552, "5.3.4 message too big", "mail")
                return
        self.s.mail_from, self.s.mail_params = addr, params.split()
        self.s.rcpts, self.s.refused = [], []
        self.reply(250, "2.1.0 ok", "mail")

    def do_RCPT(self, arg: str) -> None:
        if self.s.mail_from is None:
            self.reply(503, "5.5.1 MAIL first", "rcpt")
            return
        addr = arg[4:].strip().lstrip("<").split(">")[0] if arg.upper().startswith("TO:") else ""
        limit = self.script.get("max_rcpts")
        if limit is not None and len(self.s.rcpts) >= int(limit):
            self.s.refused.append(addr)
            self.reply(452, "4.5.3 too many recipients", "rcpt")
            return
        scripted = (self.script.get("rcpt") or {}).get(addr)
        if scripted:
            self.s.refused.append(addr)
            self.reply(int(scripted[0]), scripted[1], "rcpt")
            return
        self.s.rcpts.append(addr)
        self.reply(250, "2.1.5 ok", "rcpt")

    def do_DATA(self, arg: str) -> None:
        if self.s.mail_from is None or not self.s.rcpts:
            self.reply(503, "5.5.1 no valid recipients", "data")
            return
        code = self.scripted("data", (354, "end with <CRLF>.<CRLF>"), "data")
        if code == 354:
            self.data = []

    def _end_data(self) -> None:
        assert self.data is not None
        lines, self.data = self.data, None
        body = b"".join(x + b"\r\n" for x in lines)
        code = self.scripted("data_end", (250, "2.0.0 queued"), "data_end")
        if code < 400:
            peer = self._tx.getPeer()
            self.server._record(
                Transaction(
                    helo=self.s.helo,
                    mail_from=self.s.mail_from or "",
                    mail_params=self.s.mail_params,
                    rcpts=self.s.rcpts,
                    refused_rcpts=self.s.refused,
                    data=body,
                    tls=self.s.tls,
                    auth_user=self.s.auth_user,
                    peer=getattr(peer, "host", ""),
                )
            )
        self.s = _Session(helo=self.s.helo, tls=self.s.tls, auth_user=self.s.auth_user)


class _Factory(protocol.ServerFactory):
    def __init__(self, server: RecordingSMTPServer) -> None:
        self.server = server

    def buildProtocol(self, addr: Any) -> _MXProtocol:
        p = _MXProtocol(self.server)
        p.factory = self
        self.server.protocols.append(p)
        return p


class RecordingSMTPServer:
    """Listens, records each transaction to ``transactions`` (and ``record_dir`` if given)."""

    def __init__(self, script: dict[str, Any] | None = None, record_dir: str | None = None) -> None:
        self.script: dict[str, Any] = dict(script or {})
        self.record_dir = record_dir
        self.transactions: list[Transaction] = []
        self.commands: list[str] = []  # command lines received; AUTH arguments masked
        self.connections = 0
        self.protocols: list[_MXProtocol] = []
        self.port = 0
        self._listener: Any = None
        self.tls_context: Any = None
        tls = self.script.get("starttls")
        if tls:
            from mailsuite.tls import ServerTLS

            self.tls_context = ServerTLS([(tls["cert"], tls["key"])], check_interval=None)

    def start(self, reactor: Any, interface: str = "127.0.0.2", port: int = 0) -> int:
        self._listener = reactor.listenTCP(port, _Factory(self), interface=interface)
        self.port = int(self._listener.getHost().port)
        return self.port

    def stop(self) -> defer.Deferred[Any]:
        listener, self._listener = self._listener, None
        for p in self.protocols:
            if p.transport is not None:
                transport_of(p).abortConnection()
        return defer.maybeDeferred(listener.stopListening) if listener else defer.succeed(None)

    def _record(self, t: Transaction) -> None:
        self.transactions.append(t)
        if self.record_dir:
            n = len(self.transactions)
            base = Path(self.record_dir, f"{n:04d}")
            with base.with_suffix(".eml.tmp").open("wb") as f:
                f.write(t.data)
            envelope = asdict(t)
            del envelope["data"]
            with base.with_suffix(".json").open("w", encoding="utf-8") as f:
                json.dump(envelope, f)
            # .eml appears last: the record is whole
            base.with_suffix(".eml.tmp").rename(base.with_suffix(".eml"))


def spawn_mx_server(
    listen: str, record_dir: str, script: dict[str, Any] | None = None
) -> tuple[subprocess.Popen[str], int]:
    """Run ``python -m mailsuite.testing.mx`` and wait until it listens; (process, port)."""
    cmd = [sys.executable, "-m", "mailsuite.testing.mx", "--listen", listen, "--record", record_dir]
    if script is not None:
        cmd += ["--script", json.dumps(script)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("ready "):
        proc.kill()
        raise RuntimeError(f"MX server did not start: {line!r}")
    return proc, int(line.split()[1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="recording SMTP server for tests")
    parser.add_argument("--listen", default="127.0.0.2:2525", help="ADDRESS:PORT (port 0 ok)")
    parser.add_argument("--record", default=None, help="directory for NNNN.eml / NNNN.json")
    parser.add_argument("--script", default=None, help="JSON text or a JSON file")
    args = parser.parse_args(argv)
    script = None
    if args.script:
        if args.script.lstrip().startswith("{"):
            script = json.loads(args.script)
        else:
            with Path(args.script).open(encoding="utf-8") as f:
                script = json.load(f)
    host, _, port = args.listen.rpartition(":")
    from twisted.internet import reactor

    server = RecordingSMTPServer(script, args.record)
    bound = server.start(reactor, host.strip("[]"), int(port))
    print(f"ready {bound}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
