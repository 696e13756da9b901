"""The configuration's model: the frozen, validated objects :mod:`mailsuite.config` builds
from TOML, and the fixed sets of names it checks against.

Apart from the reading so that a module that only needs the types (or a test that builds a
config by hand) does not take in the TOML reader, and so each file stays readable.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "CLIENT_SERVICES",
    "LOG_FORMATS",
    "MODES",
    "ROUTE_TLS",
    "SERVICES",
    "AuthConfig",
    "Config",
    "ConfigError",
    "DNSConfig",
    "IMAPConfig",
    "MailAuthConfig",
    "POP3Config",
    "RelayConfig",
    "RelayRoute",
    "SMTPLimits",
    "SandboxConfig",
    "SieveConfig",
    "TLSPair",
    "WebConfig",
]

SERVICES = (
    "smtp",
    "submission",
    "submissions",
    "imap",
    "imaps",
    "pop3",
    "pop3s",
    "managesieve",
    "web",
)

#: Services a mail client is told about by autoconfiguration (``[web] public_ports`` keys).
CLIENT_SERVICES = ("imaps", "imap", "pop3s", "pop3", "submissions", "submission")

LOG_FORMATS = ("text", "json")

#: ``[server] mode``: a mail server, or a capture server for testing applications (sandbox).
MODES = ("server", "sandbox")


class ConfigError(Exception):
    """A configuration problem, worded as ``FILE: [section] key: what is wrong``."""


@dataclass(frozen=True)
class TLSPair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class SMTPLimits:
    """Limits of the SMTP server; the defaults follow RFC 5321 section 4.5.3."""

    max_message_size: int = 50 * 1024 * 1024
    max_recipients: int = 100
    max_errors: int = 10
    max_line_length: int = 998  # RFC 5321 4.5.3.1.6: 1000 octets with CRLF
    #: RFC 5321 4.5.3.2.7: 5 minutes for each command line from the moment the server waits
    #: for it (bytes trickling in do not extend it), and for each 64 KiB of DATA (4.5.3.2.5)
    timeout: int = 300
    #: a whole session, connect to close: a slow client cannot hold a connection for ever
    session_timeout: int = 3600
    #: submission only: connect to successful AUTH (Dovecot drops others after 3 minutes)
    login_timeout: int = 180
    max_hops: int = 50  # Received headers before a loop is declared (RFC 5321 6.3)
    # Connection limits (0 = none), see mailsuite.connection_limits.  The submission
    # listeners (587 and 465 together) are counted apart from the MX listener with the same
    # numbers, so a flood on port 25 cannot lock the users out of submission.
    max_connections: int = 500
    max_connections_per_ip: int = 50  # before AUTH; [relay] trusted_networks are exempt
    min_free_space: int | None = None  # MAIL gets 452 4.3.1 below (None: store.space's default)


#: ``tls`` of a route: no TLS; STARTTLS when offered; STARTTLS or a temporary failure;
#: TLS from the first byte (RFC 8314, port 465 style).
ROUTE_TLS = ("none", "opportunistic", "required", "implicit")


@dataclass(frozen=True)
class RelayRoute:
    """One next hop of ``[relay] routes`` (a smarthost is the ``"*"`` route).

    ``pattern`` is the recipient domain it serves: ``example.org`` exactly, ``.example.org``
    its subdomains, or ``*`` every domain without a route of its own.  ``mx`` True is the
    ``host:port`` form (deliver to the MX hosts of ``host``), False the ``[host]:port`` form
    (``host``'s own A/AAAA records, or an IP address), as in Postfix's transport maps."""

    pattern: str
    host: str  # a host name or an IP address, without brackets
    port: int
    mx: bool
    tls: str = "opportunistic"  # one of ROUTE_TLS
    tls_verify: bool = False
    user: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def key(self) -> str:
        """The queue runner's group key: recipients of one route go out together."""
        return f"[route {self.pattern}]"

    @property
    def next_hop(self) -> str:
        host = self.host if ":" not in self.host else f"IPv6:{self.host}"
        return f"{host}:{self.port}" if self.mx else f"[{host}]:{self.port}"


@dataclass(frozen=True)
class RelayConfig:
    trusted_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    port: int = 25
    smarthost: str | None = None
    smarthost_user: str | None = None
    smarthost_password: str | None = None
    smarthost_tls: str = "required"  # "required" | "implicit"
    tls_verify: bool = False
    smarthost_verify: bool = True  # check the smarthost's certificate (credentials go there)
    tls_ca: Path | None = None  # PEM trust roots for verification; None = the system store
    max_deliveries: int = 10  # destinations (domains) delivered to at the same time
    retry_initial: int = 300
    retry_max: int = 4 * 3600
    lifetime: int = 5 * 86400
    delay_warning: int = 4 * 3600  # 0 disables the "delayed" DSN
    #: ``[relay] routes`` plus the smarthost as the ``"*"`` route (see RelayRoute)
    routes: tuple[RelayRoute, ...] = ()

    def is_trusted(self, host: str) -> bool:
        if not self.trusted_networks:
            return False  # (asked for every message: no address parse when none is trusted)
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(addr in net for net in self.trusted_networks)


@dataclass(frozen=True)
class AuthConfig:
    """Failed-login throttling shared by SMTP AUTH, IMAP and POP3."""

    max_failures_per_ip: int = 10
    max_failures_per_user: int = 20
    window: int = 900
    allow_plaintext: bool = False  # allow LOGIN/USER/AUTH before TLS (not recommended)


@dataclass(frozen=True)
class IMAPConfig:
    max_literal: int = 64 * 1024 * 1024
    idle_timeout: int = 1800  # RFC 3501 5.4: at least 30 minutes
    max_connections: int = 1000  # imap and imaps together (0 = no limit)
    max_connections_per_ip: int = 50  # not logged in, per client address
    max_userip_connections: int = 20  # logged in, per user and address (Dovecot's 10)
    login_timeout: int = 180  # connect to LOGIN/AUTHENTICATE (RFC 3501 5.4 lets it be short)


@dataclass(frozen=True)
class POP3Config:
    leave_on_server_mark_seen: bool = True
    expire: str | None = None
    login_delay: int | None = None
    max_connections: int = 500  # pop3 and pop3s together (0 = no limit)
    max_connections_per_ip: int = 50  # not logged in, per client address
    # No per-user limit: the maildrop lock already allows one session per user (RFC 1939 8).
    #: connect to successful login (the 10 minutes of RFC 1939 3 apply after login)
    login_timeout: int = 180


@dataclass(frozen=True)
class DNSConfig:
    """How the server asks DNS: which servers (None: the system's resolv.conf) and how long one
    query may take before it counts as a temporary error."""

    nameservers: tuple[str, ...] | None = None
    timeout: int = 10


@dataclass(frozen=True)
class MailAuthConfig:
    """SPF/DKIM/DMARC/ARC checks on the MX listener and DKIM signing of outgoing mail.

    Each check can be turned off; ``dmarc_reject`` = "quarantine" delivers mail that a DMARC
    policy of p=reject would refuse to the Junk folder instead.  ``max_signatures`` bounds the
    DKIM signatures verified per message (RFC 6376 6.1 lets a verifier limit them).
    """

    spf: bool = True
    dkim: bool = True
    dmarc: bool = True
    arc: bool = True
    dmarc_reject: str = "reject"  # "reject" | "quarantine"
    max_signatures: int = 5
    sign: bool = True
    threads: int = 8

    @property
    def verifies(self) -> bool:
        return self.spf or self.dkim or self.dmarc or self.arc


@dataclass(frozen=True)
class SieveConfig:
    """Limits of Sieve filtering (RFC 5228 10) and of ManageSieve (RFC 5804)."""

    max_script_size: int = 1024 * 1024  # bytes; also the largest ManageSieve literal
    max_scripts: int = 100  # per user
    max_actions: int = 32  # per message
    max_redirects: int = 4  # per message
    max_run_time: int = 5  # seconds one script may run for one message
    vacation_min_period: int = 86400  # RFC 5230 4.1: one day unless the site allows less
    vacation_max_period: int = 90 * 86400
    max_connections: int = 100  # ManageSieve connections (0 = no limit)
    max_connections_per_ip: int = 10  # not logged in, per client address
    login_timeout: int = 180  # ManageSieve: connect to a successful AUTHENTICATE


@dataclass(frozen=True)
class WebConfig:
    """The HTTP listener's settings (health, metrics, client autoconfiguration)."""

    #: service -> port to announce to mail clients instead of the listener's own port (for
    #: listeners behind port forwarding, or endpoints without a port such as systemd:).
    public_ports: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class SandboxConfig:
    """``[sandbox]``: the capture mode's settings (see mailsuite.sandbox)."""

    max_messages: int = 5000  # per inbox; the oldest go first
    release: bool = False  # POST /api/v1/message/{ID}/release may send through the queue


@dataclass(frozen=True)
class Config:
    path: Path | None
    hostname: str
    data_dir: Path
    listen: dict[str, tuple[str, ...]]
    tls: tuple[TLSPair, ...]
    local_domains: tuple[str, ...]
    smtp: SMTPLimits = field(default_factory=SMTPLimits)
    relay: RelayConfig = field(default_factory=RelayConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    imap: IMAPConfig = field(default_factory=IMAPConfig)
    pop3: POP3Config = field(default_factory=POP3Config)
    dns: DNSConfig = field(default_factory=DNSConfig)
    mail_auth: MailAuthConfig = field(default_factory=MailAuthConfig)
    sieve: SieveConfig = field(default_factory=SieveConfig)
    log_format: str = "text"  # "text" or "json" (one JSON object per line)
    web: WebConfig = field(default_factory=WebConfig)
    mode: str = "server"  # one of MODES
    workers: int = 1  # processes serving the listeners, 0 = "auto" (see mailsuite.workers)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)

    @property
    def nameservers(self) -> tuple[str, ...] | None:
        return self.dns.nameservers

    @property
    def where(self) -> str:
        return str(self.path) if self.path else "<embedded default>"

    @property
    def mail_dir(self) -> Path:
        return self.data_dir / "mail"

    @property
    def dkim_dir(self) -> Path:
        """DKIM keys: ``<domain>/<selector>.key`` (see mailsuite.mailauth.dkim_keys)."""
        return self.data_dir / "dkim"

    @property
    def directory_file(self) -> Path:
        return self.data_dir / "directory.json"
