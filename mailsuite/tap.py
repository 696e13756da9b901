"""``twistd mailsuite`` options and service maker (the plugin in twisted/plugins points here)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from twisted.application import service
from twisted.logger import ILogObserver
from twisted.python import usage
from twisted.python.components import Componentized

from mailsuite.config import Config, ConfigError, load_config

if TYPE_CHECKING:
    from mailsuite.loglines import LineLog


class Options(usage.Options):
    synopsis = "[--config FILE | --sandbox]"
    longdesc = (
        "Run the mailsuite mail server.  Without --config it runs the embedded default: "
        "127.0.0.1 on unprivileged ports, data under ./mailsuite-data, domain example.test.  "
        "--sandbox runs the embedded sandbox instead: a capture server for testing the mail "
        "applications send (SMTP 127.0.0.1:1025, web and API 8025, IMAP 1143, POP3 1110, "
        "data under ./mailsuite-sandbox)."
    )
    optParameters: ClassVar[list[list[str | None]]] = [
        ["config", "c", None, "Path to the TOML configuration file."]
    ]
    optFlags: ClassVar[list[list[str | None]]] = [
        ["sandbox", None, "Run the embedded sandbox configuration (capture mode)."]
    ]

    def postOptions(self) -> None:
        if self["sandbox"] and self["config"]:
            raise usage.UsageError(
                "--sandbox runs the embedded sandbox configuration; for your own file set "
                '[server] mode = "sandbox" in it and give only --config'
            )
        try:
            if self["sandbox"]:
                from mailsuite.sandbox.defaults import SANDBOX_TOML

                self.config: Config = load_config(None, SANDBOX_TOML)
            else:
                self.config = load_config(self["config"])
        except ConfigError as e:
            # twistd prints UsageError as one line and exits non-zero.
            raise usage.UsageError(str(e)) from None


def makeService(options: Options) -> Any:
    from mailsuite.loglines import twistd_observer
    from mailsuite.service import makeService as build

    try:
        top = build(options.config, run_as=_run_as(options))
    except ConfigError as e:
        # Problems found while building (a certificate that does not load, a bad POP3
        # EXPIRE value): one line naming file, key and problem, exit status 1, no traceback.
        raise SystemExit(f"mailsuite: {e}") from None
    # The log's output is ours (twistd's file or stdout, in the configured format), so that
    # worker processes can hand this process finished lines to write (mailsuite.loglines).
    parent = getattr(options, "parent", None)
    if parent is not None:  # under twistd: this process's reactor is the server's
        from twisted.internet import reactor

        from mailsuite.stopping import stop_once

        stop_once(reactor)
    make = twistd_observer(parent, options.config.log_format) if parent is not None else None
    if make is None:
        return top
    return _WithLogObserver(top, make)


class _WithLogObserver(service.MultiService):
    """The server, plus the log observer of the twistd application it joins.

    twistd makes the application after calling :func:`makeService`, then starts logging with
    the application's ``ILogObserver`` component if it has one (``AppLogger.start``); joining
    the application is the one moment this code holds it, so the log is opened then (not
    when the service is only built).  The worker supervisor, if any, writes its workers'
    finished lines through the same observer."""

    def __init__(self, server: service.MultiService, make: Callable[[], LineLog]) -> None:
        service.MultiService.__init__(self)  # by name: Twisted's is unannotated (setup.cfg)
        server.setServiceParent(self)
        self.server = server
        self.runtime = getattr(server, "runtime", None)
        self.make = make

    def setServiceParent(self, parent: Any) -> Any:  # noqa: N802
        if isinstance(parent, Componentized):
            observer = self.make()
            parent.setComponent(ILogObserver, observer)
            supervisor = self.server.namedServices.get("workers")
            if supervisor is not None:
                supervisor.log_lines = observer
        return service.MultiService.setServiceParent(self, parent)


def _run_as(options: Options) -> tuple[int, int] | None:
    """The ``--uid``/``--gid`` given to twistd itself (the parent of our options), if any."""
    parent = getattr(options, "parent", None)
    if parent is None:
        return None
    uid, gid = parent.get("uid"), parent.get("gid")
    if uid is None:
        return None
    if gid is None:
        import pwd

        gid = pwd.getpwuid(uid).pw_gid  # what twistd itself will use
    return int(uid), int(gid)
