"""Mail client autoconfiguration: tell a client which servers, ports and security to use.

* Thunderbird (and K-9, Evolution, FairEmail ...): ``GET /mail/config-v1.1.xml?emailaddress=``
  (asked for at ``autoconfig.<domain>``) and ``GET /.well-known/autoconfig/mail/config-v1.1.xml``
  (at ``<domain>``), in the "clientConfig 1.1" format of Mozilla's ISPDB
  (https://wiki.mozilla.org/Thunderbird:Autoconfiguration:ConfigFileFormat).
* Outlook: ``POST /autodiscover/autodiscover.xml`` with a POX request naming the address, answered
  in the ``outlook/responseschema/2006a`` schema (Microsoft's "POX Autodiscover" reference).

What is announced: ``[server] hostname``; for each client service that listens (IMAP with
implicit TLS, IMAP with STARTTLS, POP3 likewise, submission on 465 and 587 roles), the port of
its first ``[listen]`` endpoint, or ``[web] public_ports`` where the port clients reach differs
(port forwarding, systemd: endpoints).  Implicit TLS first (RFC 8314 3.3 prefers it).  The SMTP
MX listener is never announced: it takes no logins.  The user name is the full address.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs
from xml.sax.saxutils import escape

from twisted.web import http

from mailsuite.config import CLIENT_SERVICES, Config, endpoint_port
from mailsuite.directory import split_address, valid_mailbox_address
from mailsuite.web.site import Endpoint, reply

XML = b"application/xml; charset=utf-8"
OUTLOOK_REQUEST_NS = "http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006"
OUTLOOK_RESPONSE_NS = "http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006"
OUTLOOK_SCHEMA = "http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a"

#: service -> (protocol, implicit TLS)
_ROLES = {
    "imaps": ("imap", True),
    "imap": ("imap", False),
    "pop3s": ("pop3", True),
    "pop3": ("pop3", False),
    "submissions": ("smtp", True),
    "submission": ("smtp", False),
}


@dataclass(frozen=True)
class ClientServer:
    """One server a mail client may use."""

    protocol: str  # "imap", "pop3" or "smtp"
    port: int
    implicit_tls: bool  # False: STARTTLS (the listener refuses logins before it)


def client_servers(config: Config) -> list[ClientServer]:
    """The servers to announce, preferred first (see the module docstring)."""
    out = []
    for service in CLIENT_SERVICES:
        descs = config.listen.get(service, ())
        if not descs:
            continue
        port = config.web.public_ports.get(service) or endpoint_port(descs[0])
        if not port:
            continue  # no port known (unix:, systemd:, port 0) and none configured
        protocol, implicit = _ROLES[service]
        out.append(ClientServer(protocol, port, implicit))
    return out


def _address(value: str, local_domain: Any) -> tuple[str, str] | None:
    """(address, domain) if ``value`` is an address of a local domain, else None."""
    value = value.strip()
    if not valid_mailbox_address(value):
        return None
    _, domain = split_address(value)
    return (value, domain) if local_domain(domain) else None


def thunderbird_xml(hostname: str, domains: list[str], servers: list[ClientServer]) -> bytes:
    """A clientConfig 1.1 document for ``domains`` (the first is the provider id)."""
    root = ET.Element("clientConfig", version="1.1")
    provider = ET.SubElement(root, "emailProvider", id=domains[0])
    for domain in domains:
        ET.SubElement(provider, "domain").text = domain
    ET.SubElement(provider, "displayName").text = f"{domains[0]} mail ({hostname})"
    ET.SubElement(provider, "displayShortName").text = domains[0]
    for s in servers:
        tag, kind = (
            ("outgoingServer", "smtp") if s.protocol == "smtp" else ("incomingServer", s.protocol)
        )
        server = ET.SubElement(provider, tag, type=kind)
        ET.SubElement(server, "hostname").text = hostname
        ET.SubElement(server, "port").text = str(s.port)
        ET.SubElement(server, "socketType").text = "SSL" if s.implicit_tls else "STARTTLS"
        ET.SubElement(server, "username").text = "%EMAILADDRESS%"
        # cleartext inside TLS: the listeners refuse passwords before TLS
        ET.SubElement(server, "authentication").text = "password-cleartext"
    xml: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)  # bytes for an encoding
    return xml


def outlook_xml(hostname: str, address: str, servers: list[ClientServer]) -> bytes:
    """A POX Autodiscover response: one Protocol per type, the preferred server of each.
    Written as text so that the Response element carries its schema as the default namespace,
    the form Outlook's own servers send."""
    protocols = []
    seen: set[str] = set()
    for s in servers:
        if s.protocol in seen:
            continue
        seen.add(s.protocol)
        # Encryption overrides SSL: "SSL" is TLS from the first byte, "TLS" is STARTTLS
        fields = [
            ("Type", s.protocol.upper()),
            ("Server", hostname),
            ("Port", str(s.port)),
            ("DomainRequired", "off"),
            ("LoginName", address),
            ("SPA", "off"),
            ("SSL", "on"),
            ("Encryption", "SSL" if s.implicit_tls else "TLS"),
            ("AuthRequired", "on"),
        ]
        if s.protocol == "smtp":
            fields += [("UsePOPAuth", "off"), ("SMTPLast", "off")]
        inner = "".join(f"<{k}>{escape(v)}</{k}>" for k, v in fields)
        protocols.append(f"<Protocol>{inner}</Protocol>")
    text = (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        f'<Autodiscover xmlns="{OUTLOOK_RESPONSE_NS}">'
        f'<Response xmlns="{OUTLOOK_SCHEMA}">'
        f"<User><DisplayName>{escape(address)}</DisplayName>"
        f"<EMailAddress>{escape(address)}</EMailAddress></User>"
        "<Account><AccountType>email</AccountType><Action>settings</Action>"
        + "".join(protocols)
        + "</Account></Response></Autodiscover>\n"
    )
    return text.encode("utf-8")


class ThunderbirdConfig(Endpoint):
    """``GET .../config-v1.1.xml[?emailaddress=ADDR]``: all local domains without an address,
    404 for an address of a domain this server does not receive mail for."""

    def __init__(self, runtime: Any) -> None:
        super().__init__()
        self.runtime = runtime

    def answer(self, request: Any) -> bytes:
        config = self.runtime.config
        directory = self.runtime.directory
        query = parse_qs(request.uri.partition(b"?")[2].decode("utf-8", "replace"))
        given = query.get("emailaddress", [])
        if given:
            found = _address(given[0], directory.is_local_domain)
            if found is None:
                return reply(request, http.NOT_FOUND, "no mail service here for that address\n")
            domains = [found[1]]
        else:
            domains = directory.domains()
            if not domains:
                return reply(request, http.NOT_FOUND, "no mail domains configured\n")
        body = thunderbird_xml(config.hostname, domains, client_servers(config))
        return reply(request, http.OK, body, XML)


class OutlookAutodiscover(Endpoint):
    """``POST /autodiscover/autodiscover.xml`` (POX): 400 for a body that is not a POX
    request, 404 for an address of a domain this server does not receive mail for."""

    methods = (b"POST",)

    def __init__(self, runtime: Any) -> None:
        super().__init__()
        self.runtime = runtime

    def answer(self, request: Any) -> bytes:
        body = request.content.read()
        if b"<!DOCTYPE" in body.upper() or b"<!ENTITY" in body.upper():
            return reply(request, http.BAD_REQUEST, "document type declarations not accepted\n")
        try:
            doc = ET.fromstring(body)
        except ET.ParseError:
            return reply(request, http.BAD_REQUEST, "not an XML autodiscover request\n")
        email = doc.find(f"{{{OUTLOOK_REQUEST_NS}}}Request/{{{OUTLOOK_REQUEST_NS}}}EMailAddress")
        if email is None:
            email = doc.find("Request/EMailAddress")  # some clients omit the namespace
        if email is None or not (email.text or "").strip():
            return reply(request, http.BAD_REQUEST, "no Request/EMailAddress in the request\n")
        schema = doc.find(
            f"{{{OUTLOOK_REQUEST_NS}}}Request/{{{OUTLOOK_REQUEST_NS}}}AcceptableResponseSchema"
        )
        if schema is not None and (schema.text or "").strip() not in ("", OUTLOOK_SCHEMA):
            return reply(request, http.NOT_FOUND, "only the Outlook 2006a schema is offered\n")
        found = _address(email.text or "", self.runtime.directory.is_local_domain)
        if found is None:
            return reply(request, http.NOT_FOUND, "no mail service here for that address\n")
        config = self.runtime.config
        return reply(
            request, http.OK, outlook_xml(config.hostname, found[0], client_servers(config)), XML
        )
