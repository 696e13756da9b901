"""TOML configuration -> frozen, validated objects.

Every error names the file, the key and what is wrong, because the person reading it is
usually starting the server by hand and needs to know what to fix, not where Python failed.
``load_config(None)`` gives the embedded default: a working local server on unprivileged
127.0.0.1 ports with its data under ``./mailsuite-data``.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mailsuite.config_model import (
    CLIENT_SERVICES,
    LOG_FORMATS,
    MODES,
    ROUTE_TLS,
    SERVICES,
    AuthConfig,
    Config,
    ConfigError,
    DNSConfig,
    IMAPConfig,
    MailAuthConfig,
    POP3Config,
    RelayConfig,
    RelayRoute,
    SandboxConfig,
    SieveConfig,
    SMTPLimits,
    TLSPair,
    WebConfig,
)

__all__ = [
    "CLIENT_SERVICES",
    "DEFAULT_TOML",
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
    "endpoint_port",
    "load_config",
    "parse_config",
]

#: The embedded default, the same values as the commented ``etc/mailsuite.toml``
#: (a unit test keeps the two in step).
DEFAULT_TOML = """
[server]
hostname = "localhost"
data_dir = "mailsuite-data"

[listen]
smtp = ["tcp:2525:interface=127.0.0.1"]
submission = ["tcp:2587:interface=127.0.0.1"]
submissions = ["tcp:2465:interface=127.0.0.1"]
imap = ["tcp:2143:interface=127.0.0.1"]
imaps = ["tcp:2993:interface=127.0.0.1"]
pop3 = ["tcp:2110:interface=127.0.0.1"]
pop3s = ["tcp:2995:interface=127.0.0.1"]
managesieve = ["tcp:24190:interface=127.0.0.1"]
web = ["tcp:2080:interface=127.0.0.1"]

[domains]
local = ["example.test"]
"""


class _Reader:
    """Typed access to one TOML table with errors that name file and key."""

    def __init__(self, where: str, section: str, table: Any) -> None:
        self.where = where
        self.section = section
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: [{section}] must be a table")
        self.table: dict[str, Any] = table
        self.used: set[str] = set()

    def fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.where}: [{self.section}] {key}: {problem}")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any) -> Any:
        self.used.add(key)
        if key not in self.table:
            return default
        value = self.table[key]
        if kind is int and isinstance(value, bool):
            raise self.fail(key, f"expected an integer, got {value!r}")
        if not isinstance(value, kind):
            names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            raise self.fail(key, f"expected {names}, got {type(value).__name__} {value!r}")
        return value

    def positive(self, key: str, default: int, minimum: int = 1) -> int:
        value = self.get(key, int, default)
        if value < minimum:
            raise self.fail(key, f"must be at least {minimum}, got {value}")
        return int(value)

    def strings(self, key: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        value = self.get(key, list, list(default))
        for item in value:
            if not isinstance(item, str):
                raise self.fail(key, f"expected a list of strings, found {item!r}")
        return tuple(value)

    def finish(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            raise self.fail(
                unknown[0], "unknown key (check the spelling against etc/mailsuite.toml)"
            )


def endpoint_port(desc: str) -> int | None:
    """The port number of a ``tcp:``/``tcp6:``/``ssl:`` endpoint description (the first
    positional argument or ``port=``), None for other kinds or when there is none."""
    kind, _, rest = desc.partition(":")
    if kind not in ("tcp", "tcp6", "ssl"):
        return None
    # arguments are separated by ":" not escaped with a backslash (twisted's syntax)
    args = re.split(r"(?<!\\):", rest) if rest else []
    positional = [a for a in args if "=" not in a]
    keyword = [a.split("=", 1)[1] for a in args if a.startswith("port=")]
    text = keyword[0] if keyword else positional[0] if positional else ""
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        return None
    return int(text)


def _check_endpoint(reader: _Reader, key: str, desc: str) -> None:
    """Validate an endpoint description's syntax without binding anything."""
    kind = desc.split(":", 1)[0]
    if kind not in ("tcp", "tcp6", "unix", "ssl", "systemd"):
        raise reader.fail(key, f"{desc!r} is not a server endpoint description (e.g. 'tcp:25')")
    if kind in ("tcp", "tcp6", "ssl") and endpoint_port(desc) is None:
        raise reader.fail(key, f"{desc!r} has no valid port number")


def _domain(reader: _Reader, key: str, name: str) -> str:
    name = name.strip().lower().rstrip(".")
    try:
        ascii_name = name.encode("idna").decode("ascii")
    except UnicodeError:
        raise reader.fail(key, f"{name!r} is not a valid domain name") from None
    if not ascii_name or any(not label for label in ascii_name.split(".")):
        raise reader.fail(key, f"{name!r} is not a valid domain name")
    return name


def _next_hop(reader: _Reader, key: str, text: str, default_port: int) -> tuple[str, int, bool]:
    """``host:port`` (MX lookup of host), ``[host]:port`` (no MX lookup), either without
    ``:port`` (``default_port``); an IP address is never looked up.  Returns (host, port, mx)."""
    how = "expected host:port (MX lookup of host) or [host]:port (no MX lookup)"
    spec = text.strip()
    if spec.startswith("["):
        host, close, rest = spec[1:].partition("]")
        if not close or (rest and not rest.startswith(":")):
            raise reader.fail(key, f"{text!r}: {how}")
        if host[:5].lower() == "ipv6:":
            host = host[5:]
        mx = False
    else:
        if spec.count(":") > 1:
            raise reader.fail(
                key, f"{text!r}: write an IPv6 address in brackets, e.g. [2001:db8::25]:25"
            )
        host, colon, port_text = spec.partition(":")
        rest = colon + port_text
        mx = True
    port_text = rest[1:]
    if rest and (not port_text.isdigit() or not 0 < int(port_text) <= 65535):
        raise reader.fail(key, f"{text!r}: the port must be a number from 1 to 65535")
    port = int(port_text) if rest else default_port
    try:
        host = str(ipaddress.ip_address(host))
        mx = False  # an address has no MX records
    except ValueError:
        if not host:
            raise reader.fail(key, f"{text!r}: {how}") from None
        host = _domain(reader, key, host)
    return host, port, mx


def _password(reader: _Reader, base: Path, key: str, file_key: str) -> str | None:
    """A password given inline (``key``) or read from a file (``file_key``; first line,
    read at start while still root, so the file can be readable by root only)."""
    inline = reader.get(key, str, "") or None
    file_text = reader.get(file_key, str, "")
    if not file_text:
        return inline
    if inline is not None:
        raise reader.fail(file_key, f"give {key} or {file_key}, not both")
    p = _path(base, file_text)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise reader.fail(file_key, f"cannot read {p}: {getattr(e, 'strerror', e)}") from None
    if not lines or not lines[0]:
        raise reader.fail(file_key, f"{p} is empty; put the password on its first line")
    return lines[0]


def _routes(relay_r: _Reader, base: Path, mx_port: int, mx_verify: bool) -> tuple[RelayRoute, ...]:
    """``[relay] routes``: recipient domain (``example.org``, ``.example.org`` for its
    subdomains, ``*``) -> ``"host:port"`` or a table with ``host`` and the optional ``tls``,
    ``tls_verify``, ``user``, ``password`` / ``password_file``."""
    table = relay_r.get("routes", dict, {})
    out: list[RelayRoute] = []
    for pattern_text, value in table.items():
        section = f"relay.routes.{_toml_key(pattern_text)}"
        if isinstance(value, str):
            value = {"host": value}
        r = _Reader(relay_r.where, section, value)
        if pattern_text == "*":
            pattern = "*"
        elif "*" in pattern_text:
            raise relay_r.fail(
                "routes",
                f"{pattern_text!r}: write .example.org for the "
                'subdomains of example.org, or "*" for every domain',
            )
        else:
            sub = pattern_text.startswith(".")
            pattern = ("." if sub else "") + _domain(relay_r, "routes", pattern_text[sub:])
        host_text = r.get("host", str, "")
        tls = r.get("tls", str, "opportunistic")
        # With TLS required, check the certificate by default (credentials may go there);
        # opportunistic TLS follows [relay] tls_verify like delivery to MX hosts.
        verify = r.get("tls_verify", bool, tls in ("required", "implicit") or mx_verify)
        user = r.get("user", str, "") or None
        password = _password(r, base, "password", "password_file")
        r.finish()
        if not host_text:
            raise r.fail("host", 'missing: the next hop, "host:port" or "[host]:port"')
        host, port, mx = _next_hop(r, "host", host_text, mx_port)
        if tls not in ROUTE_TLS:
            raise r.fail("tls", f"{tls!r}: expected one of {', '.join(ROUTE_TLS)}")
        if password is not None and user is None:
            raise r.fail("user", "missing: a password needs the user name to log in with")
        if user is not None and tls not in ("required", "implicit"):
            raise r.fail(
                "tls",
                'AUTH needs tls = "required" or "implicit" (a password '
                "is never sent in clear text)",
            )
        if any(o.pattern == pattern for o in out):
            raise relay_r.fail("routes", f"{pattern_text!r} is given twice")
        out.append(
            RelayRoute(
                pattern, host, port, mx, tls, verify, user, (password or "") if user else None
            )
        )
    return tuple(out)


def _toml_key(key: str) -> str:
    """A table key as it is written in TOML: bare when it can be, else quoted."""
    if key and all(c.isalnum() or c in "-_" for c in key) and key.isascii():
        return key
    return '"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'


#: The sections a config file may have.
SECTIONS = (
    "server",
    "listen",
    "tls",
    "domains",
    "relay",
    "smtp",
    "auth",
    "imap",
    "pop3",
    "dns",
    "mail_auth",
    "sieve",
    "web",
    "sandbox",
)


def parse_config(data: dict[str, Any], path: Path | None, base: Path) -> Config:
    """Build a :class:`Config` from parsed TOML; relative paths resolve against ``base``.

    One named step per section (each reads its table and refuses keys it does not know);
    the few values one section needs from another (the mode, the local domains) are passed
    along, so the order of the steps is the order of those needs."""
    where = str(path) if path else "<embedded default>"
    for section in data:
        if section not in SECTIONS:
            raise ConfigError(f"{where}: [{section}]: unknown section")

    def reader(section: str) -> _Reader:
        return _Reader(where, section, data.get(section, {}))

    server = _server_section(reader("server"), base)
    local = _domains_section(reader("domains"))
    return Config(
        path=path,
        hostname=server.hostname,
        data_dir=server.data_dir,
        listen=_listen_section(reader("listen"), server.mode),
        tls=_tls_section(reader("tls"), base),
        local_domains=local,
        smtp=_smtp_section(reader("smtp")),
        relay=_relay_section(reader("relay"), base, local),
        auth=_auth_section(reader("auth"), server.mode),
        imap=_imap_section(reader("imap")),
        pop3=_pop3_section(reader("pop3")),
        dns=_dns_section(reader("dns")),
        mail_auth=_mail_auth_section(reader("mail_auth")),
        sieve=_sieve_section(reader("sieve")),
        log_format=server.log_format,
        web=_web_config(reader("web")),
        mode=server.mode,
        workers=server.workers,
        sandbox=_sandbox_section(reader("sandbox")),
    )


@dataclass(frozen=True)
class _Server:
    """What ``[server]`` holds (spread over :class:`Config`'s top-level fields)."""

    hostname: str
    data_dir: Path
    log_format: str
    mode: str
    workers: int


def _server_section(r: _Reader, base: Path) -> _Server:
    hostname = r.get("hostname", str, None) or socket.getfqdn() or "localhost"
    hostname = _domain(r, "hostname", hostname)
    data_dir = Path(r.get("data_dir", str, "mailsuite-data")).expanduser()
    if not data_dir.is_absolute():
        data_dir = base / data_dir
    log_format = r.get("log_format", str, "text")
    if log_format not in LOG_FORMATS:
        raise r.fail("log_format", f"expected one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    mode = r.get("mode", str, "server")
    if mode not in MODES:
        raise r.fail("mode", f"expected one of {', '.join(MODES)}, got {mode!r}")
    raw = r.get("workers", (int, str), "auto")  # "auto" is 0: mailsuite.workers.count
    workers = 0 if raw == "auto" else raw
    if isinstance(workers, (str, bool)) or not (
        raw == "auto" or 1 <= workers <= (1 if mode == "sandbox" else 64)
    ):
        raise r.fail(
            "workers",
            'expected "auto" or a number from 1 to 64 (1 in sandbox '
            f"mode: one process holds its events and waiters), got {workers!r}",
        )
    r.finish()
    return _Server(hostname, data_dir, log_format, mode, workers)


def _listen_section(r: _Reader, mode: str) -> dict[str, tuple[str, ...]]:
    listen: dict[str, tuple[str, ...]] = {}
    for service in SERVICES:
        descs = r.strings(service)
        for desc in descs:
            _check_endpoint(r, service, desc)
        listen[service] = descs
    if mode == "sandbox" and listen["managesieve"]:
        raise r.fail("managesieve", "not available in sandbox mode (no Sieve there)")
    r.finish()
    return listen


def _tls_section(r: _Reader, base: Path) -> tuple[TLSPair, ...]:
    pairs: list[TLSPair] = []
    cert = r.get("cert", str, "")
    key = r.get("key", str, "")
    if bool(cert) != bool(key):
        raise r.fail("key" if cert else "cert", "cert and key must be given together")
    if cert:
        pairs.append(TLSPair(_path(base, cert), _path(base, key)))
    extra = r.get("extra", list, [])
    for i, item in enumerate(extra):
        if not isinstance(item, dict) or set(item) != {"cert", "key"}:
            raise r.fail(f"extra[{i}]", "expected a table with exactly cert and key")
        pairs.append(TLSPair(_path(base, item["cert"]), _path(base, item["key"])))
    r.finish()
    for pair in pairs:
        for what, p in (("cert", pair.cert), ("key", pair.key)):
            if not p.is_file():
                raise r.fail(what, f"{p} does not exist or is not a file")
    return tuple(pairs)


def _domains_section(r: _Reader) -> tuple[str, ...]:
    local = tuple(_domain(r, "local", d) for d in r.strings("local"))
    r.finish()
    return local


def _smtp_section(r: _Reader) -> SMTPLimits:
    free = r.positive("min_free_space", 0, 0) if "min_free_space" in r.table else None
    d = SMTPLimits
    smtp = SMTPLimits(
        max_message_size=r.positive("max_message_size", d.max_message_size, 1024),
        max_recipients=r.positive("max_recipients", d.max_recipients, 100),
        max_errors=r.positive("max_errors", d.max_errors),
        max_line_length=r.positive("max_line_length", d.max_line_length, 998),
        timeout=r.positive("timeout", d.timeout),
        session_timeout=r.positive("session_timeout", d.session_timeout),
        login_timeout=r.positive("login_timeout", d.login_timeout),
        max_hops=r.positive("max_hops", d.max_hops, 10),
        max_connections=r.positive("max_connections", d.max_connections, 0),
        max_connections_per_ip=r.positive("max_connections_per_ip", d.max_connections_per_ip, 0),
        min_free_space=free,  # 0: never refuse
    )
    r.finish()
    return smtp


def _relay_section(r: _Reader, base: Path, local: tuple[str, ...]) -> RelayConfig:
    nets = []
    for cidr in r.strings("trusted_networks"):
        try:
            nets.append(ipaddress.ip_network(cidr, strict=False))
        except ValueError:
            raise r.fail("trusted_networks", f"{cidr!r} is not a CIDR network") from None
    mx_port = r.positive("port", 25)
    tls_ca_text = r.get("tls_ca", str, "")
    tls_ca = _path(base, tls_ca_text) if tls_ca_text else None
    if tls_ca is not None and not tls_ca.is_file():
        raise r.fail("tls_ca", f"{tls_ca} does not exist or is not a file")
    tls_verify = r.get("tls_verify", bool, False)
    smarthost = _smarthost(r, base, mx_port)
    routes = _routes(r, base, mx_port, tls_verify)
    if smarthost.route is not None:
        if any(route.pattern == "*" for route in routes):
            raise r.fail(
                "smarthost",
                'both smarthost and routes."*" are set; they are the same thing: keep one of them',
            )
        routes += (smarthost.route,)
    d = RelayConfig
    relay = RelayConfig(
        trusted_networks=tuple(nets),
        port=mx_port,
        smarthost=smarthost.text,
        smarthost_user=smarthost.user,
        smarthost_password=smarthost.password,
        smarthost_tls=smarthost.tls,
        tls_verify=tls_verify,
        smarthost_verify=smarthost.verify,
        tls_ca=tls_ca,
        max_deliveries=r.positive("max_deliveries", d.max_deliveries),
        retry_initial=r.positive("retry_initial", d.retry_initial),
        retry_max=r.positive("retry_max", d.retry_max),
        lifetime=r.positive("lifetime", d.lifetime),
        delay_warning=r.positive("delay_warning", d.delay_warning, 0),
        routes=routes,
    )
    r.finish()
    for route in routes:
        if route.pattern in local:
            raise r.fail(
                "routes",
                f"{route.pattern!r} is a local domain ([domains] "
                "local): its mail is delivered here, never routed",
            )
    return relay


@dataclass(frozen=True)
class _Smarthost:
    """The ``[relay] smarthost*`` keys, and the ``*`` route they stand for (None: unset)."""

    text: str | None
    user: str | None
    password: str | None
    tls: str
    verify: bool
    route: RelayRoute | None


def _smarthost(r: _Reader, base: Path, mx_port: int) -> _Smarthost:
    smarthost = r.get("smarthost", str, "") or None
    hop = None
    if smarthost is not None:
        host, _, port = smarthost.rpartition(":")
        if not host or not port.isdigit():
            raise r.fail("smarthost", f"{smarthost!r}: expected host:port")
        # The smarthost is never looked up by MX (its A/AAAA records are used), with or
        # without brackets: that is what it has always meant here.
        hop = _next_hop(r, "smarthost", smarthost, mx_port)
    tls = r.get("smarthost_tls", str, "required")
    if tls not in ("required", "implicit"):
        raise r.fail("smarthost_tls", "expected 'required' (STARTTLS) or 'implicit'")
    user = r.get("smarthost_user", str, "") or None
    password = _password(r, base, "smarthost_password", "smarthost_password_file")
    verify = r.get("smarthost_verify", bool, True)
    route = None
    if hop is not None:
        host, port_number, _mx = hop
        route = RelayRoute(
            "*",
            host,
            port_number,
            mx=False,
            tls=tls,
            tls_verify=verify,
            user=user,
            password=(password or "") if user else None,
        )
    return _Smarthost(smarthost, user, password, tls, verify, route)


def _auth_section(r: _Reader, mode: str) -> AuthConfig:
    auth = AuthConfig(
        max_failures_per_ip=r.positive("max_failures_per_ip", 10),
        max_failures_per_user=r.positive("max_failures_per_user", 20),
        window=r.positive("window", 900),
        # Sandbox mode takes any password, so clear text risks nothing (and test clients
        # often speak plain text): allowed unless the config says otherwise.
        allow_plaintext=r.get("allow_plaintext", bool, mode == "sandbox"),
    )
    r.finish()
    return auth


def _imap_section(r: _Reader) -> IMAPConfig:
    d = IMAPConfig
    imap = IMAPConfig(
        max_literal=r.positive("max_literal", d.max_literal, 1024),
        idle_timeout=r.positive("idle_timeout", d.idle_timeout, 60),
        max_connections=r.positive("max_connections", d.max_connections, 0),
        max_connections_per_ip=r.positive("max_connections_per_ip", d.max_connections_per_ip, 0),
        max_userip_connections=r.positive("max_userip_connections", d.max_userip_connections, 0),
        login_timeout=r.positive("login_timeout", d.login_timeout),
    )
    r.finish()
    return imap


def _pop3_section(r: _Reader) -> POP3Config:
    d = POP3Config
    pop3 = POP3Config(
        leave_on_server_mark_seen=r.get("mark_seen_on_retr", bool, True),
        expire=r.get("expire", str, "") or None,
        login_delay=r.get("login_delay", int, 0) or None,
        max_connections=r.positive("max_connections", d.max_connections, 0),
        max_connections_per_ip=r.positive("max_connections_per_ip", d.max_connections_per_ip, 0),
        login_timeout=r.positive("login_timeout", d.login_timeout),
    )
    r.finish()
    return pop3


def _sieve_section(r: _Reader) -> SieveConfig:
    d = SieveConfig
    sieve = SieveConfig(
        max_script_size=r.positive("max_script_size", d.max_script_size, 1024),
        max_scripts=r.positive("max_scripts", d.max_scripts),
        max_actions=r.positive("max_actions", d.max_actions),
        max_redirects=r.positive("max_redirects", d.max_redirects, 0),
        max_run_time=r.positive("max_run_time", d.max_run_time),
        vacation_min_period=r.positive("vacation_min_period", d.vacation_min_period, 0),
        vacation_max_period=r.positive("vacation_max_period", d.vacation_max_period),
        max_connections=r.positive("max_connections", d.max_connections, 0),
        max_connections_per_ip=r.positive("max_connections_per_ip", d.max_connections_per_ip, 0),
        login_timeout=r.positive("login_timeout", d.login_timeout),
    )
    if sieve.vacation_max_period < sieve.vacation_min_period:
        raise r.fail("vacation_max_period", "must not be less than vacation_min_period")
    r.finish()
    return sieve


def _dns_section(r: _Reader) -> DNSConfig:
    nameservers = r.strings("nameservers") or None
    for ns in nameservers or ():
        host, _, port = ns.rpartition(":") if ns.count(":") == 1 else (ns, "", "53")
        try:
            ipaddress.ip_address(host or ns)
        except ValueError:
            raise r.fail("nameservers", f"{ns!r}: expected an IP address[:port]") from None
        if port and not port.isdigit():
            raise r.fail("nameservers", f"{ns!r}: bad port")
    dns_config = DNSConfig(
        nameservers=nameservers, timeout=r.positive("timeout", DNSConfig.timeout)
    )
    r.finish()
    return dns_config


def _mail_auth_section(r: _Reader) -> MailAuthConfig:
    dmarc_reject = r.get("dmarc_reject", str, MailAuthConfig.dmarc_reject)
    if dmarc_reject not in ("reject", "quarantine"):
        raise r.fail(
            "dmarc_reject",
            f"{dmarc_reject!r}: expected 'reject' (550 5.7.26) or 'quarantine' (deliver to Junk)",
        )
    mail_auth = MailAuthConfig(
        spf=r.get("spf", bool, True),
        dkim=r.get("dkim", bool, True),
        dmarc=r.get("dmarc", bool, True),
        arc=r.get("arc", bool, True),
        dmarc_reject=dmarc_reject,
        max_signatures=r.positive("max_signatures", MailAuthConfig.max_signatures),
        sign=r.get("sign", bool, True),
        threads=r.positive("threads", MailAuthConfig.threads),
    )
    r.finish()
    return mail_auth


def _sandbox_section(r: _Reader) -> SandboxConfig:
    sandbox = SandboxConfig(
        max_messages=r.positive("max_messages", SandboxConfig.max_messages),
        release=r.get("release", bool, False),
    )
    r.finish()
    return sandbox


def _web_config(reader: _Reader) -> WebConfig:
    ports = reader.get("public_ports", dict, {})
    public: dict[str, int] = {}
    for service, port in ports.items():
        if service not in CLIENT_SERVICES:
            raise reader.fail(
                f"public_ports.{service}",
                f"not a mail client service (one of {', '.join(CLIENT_SERVICES)})",
            )
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port <= 65535:
            raise reader.fail(f"public_ports.{service}", f"expected a port number, got {port!r}")
        public[service] = port
    reader.finish()
    return WebConfig(public_ports=public)


def _path(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


def load_config(path: str | Path | None, embedded: str = DEFAULT_TOML) -> Config:
    """Read ``path`` (or the ``embedded`` default when None: :data:`DEFAULT_TOML`, or the
    sandbox's, :data:`mailsuite.sandbox.defaults.SANDBOX_TOML`) into a :class:`Config`."""
    if path is None:
        return parse_config(tomllib.loads(embedded), None, Path.cwd())
    p = Path(path).expanduser().absolute()
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read the config file: {e.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: the config file is not UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None
    return parse_config(data, p, p.parent)
