"""``mailsuite dkim keygen|list|use`` and ``mailsuite dns records|check``.

Keys are made and switched here (see :mod:`mailsuite.mailauth.dkim_keys`); the running server
notices within a message.  ``dns check`` runs a reactor of its own for its queries, through
the same ``[dns]`` settings and DNS code the server uses, so what it reports is what the
server would see.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from typing import TYPE_CHECKING, Any

from mailsuite.config import Config

if TYPE_CHECKING:
    from mailsuite.mailauth.dkim_keys import KeyStore
    from mailsuite.mailauth.records import Finding

# The modules doing the work (cryptography, dkimpy, pyspf, twisted.names) are imported when a
# dkim or dns command runs, not when `mailsuite user ...` builds its argument parser.

__all__ = ["add_dkim_arguments", "add_dns_arguments", "run_dkim", "run_dns"]


def _error(text: str) -> int:
    print(f"mailsuite: {text}", file=sys.stderr)
    return 2


def _local_domain(cfg: Config, domain: str) -> str:
    from mailsuite.directory import Directory
    from mailsuite.mailauth.dkim_keys import KeyStore, KeyStoreError

    name = KeyStore.domain_name(domain)
    local = Directory(cfg.directory_file, cfg.mail_dir, cfg.local_domains).domains()
    if name not in local:
        raise KeyStoreError(
            f"{name} is not a local domain of this server (add it with "
            f"'mailsuite domain add {name}')"
        )
    return name


# ------------------------------------------------------------------ dkim


def add_dkim_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    kg = sub.add_parser("keygen", help="make a key and print the DNS record to publish")
    kg.add_argument("domain")
    kg.add_argument(
        "--selector",
        "-s",
        required=True,
        help="the new selector, e.g. s2026 (a new one for every key)",
    )
    kg.add_argument(
        "--algorithm",
        "-a",
        choices=("rsa", "ed25519"),
        default="rsa",
        help="rsa (2048 bits, understood everywhere) or ed25519 (RFC 8463)",
    )
    sub.add_parser("list", help="domains, selectors, algorithms and which one signs")
    use = sub.add_parser("use", help="sign with this selector from now on (rotation)")
    use.add_argument("domain")
    use.add_argument("selector")


def run_dkim(cfg: Config, args: argparse.Namespace) -> int:
    from mailsuite.mailauth.dkim_keys import KeyStore, KeyStoreError

    store = KeyStore(cfg.dkim_dir)
    try:
        if args.action == "keygen":
            domain = _local_domain(cfg, args.domain)
            key, signs = store.generate(domain, args.selector, args.algorithm)
            print(key.zone_line())
            if signs:
                print(
                    f"; {domain} is signed with this {key.algorithm} key from now on "
                    "(publish the record above first, then check: mailsuite dns check "
                    f"{domain})"
                )
            else:
                print(
                    f"; not signing yet: publish the record, wait for its TTL, then "
                    f"'mailsuite dkim use {domain} {key.selector}'"
                )
            return 0
        if args.action == "use":
            key = store.use(args.domain, args.selector)
            print(
                f"{key.domain}: {key.algorithm} signatures use selector {key.selector} from "
                "now on (a running server picks this up with its next message); keep the "
                "old selector's record published for a few days"
            )
            return 0
        return _dkim_list(store)
    except KeyStoreError as e:
        return _error(str(e))


def _dkim_list(store: KeyStore) -> int:
    rows = []
    for domain in store.domains():
        signing = store.signing(domain)
        for key in store.keys(domain):
            state = "signing" if signing.get(key.kind) == key.selector else "-"
            rows.append((domain, key.selector, key.algorithm, str(key.bits), key.created, state))
    if not rows:
        print("no DKIM keys (make one: mailsuite dkim keygen DOMAIN --selector S)")
        return 0
    head = ("DOMAIN", "SELECTOR", "ALGORITHM", "BITS", "CREATED", "STATE")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for row in [head, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0


# ------------------------------------------------------------------ dns


def add_dns_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    for name, helptext in (
        ("records", "print the records DOMAIN needs, as zone-file lines"),
        ("check", "compare them with DNS; exit 1 when something is wrong"),
    ):
        c = sub.add_parser(name, help=helptext)
        c.add_argument("domain")
        c.add_argument(
            "--ip",
            action="append",
            default=[],
            metavar="ADDRESS",
            help="a public address of this server (repeat for IPv4 and IPv6); "
            "used for A/AAAA, SPF and PTR",
        )


def _addresses(values: list[str]) -> list[str]:
    from mailsuite.mailauth.dkim_keys import KeyStoreError

    out = []
    for v in values:
        try:
            out.append(str(ipaddress.ip_address(v.strip("[]"))))
        except ValueError:
            raise KeyStoreError(f"--ip {v!r} is not an IP address") from None
    return out


def run_dns(cfg: Config, args: argparse.Namespace) -> int:
    from mailsuite.mailauth.dkim_keys import KeyStore, KeyStoreError
    from mailsuite.mailauth.records import expected_records, run_checks

    try:
        domain = _local_domain(cfg, args.domain)
        addresses = _addresses(args.ip)
    except KeyStoreError as e:
        return _error(str(e))
    if "." not in cfg.hostname:
        print(
            f"mailsuite: warning: [server] hostname is {cfg.hostname!r}; set it to this "
            "server's public name (the MX target) in the config",
            file=sys.stderr,
        )
    store = KeyStore(cfg.dkim_dir)
    expected = expected_records(cfg, domain, store.keys(domain), store.signing(domain), addresses)
    if args.action == "records":
        for record in expected:
            print(record.zone_line())
            if record.note:
                print(f"; ^ {record.note}")
        if not addresses:
            print(
                f"; also: {cfg.hostname}. IN A/AAAA <the server's address>, and its PTR "
                "(give --ip ADDRESS to print them)"
            )
        return 0
    findings = _in_reactor(lambda reactor: run_checks(cfg, domain, expected, addresses, reactor))
    return _report(findings)


def _report(findings: list[Finding]) -> int:
    from mailsuite.mailauth.records import MISSING, OK

    for f in findings:
        e = f.expected
        status = f.status if e.required or f.status == OK else f"{f.status} (optional)"
        print(f"{status:20} {e.kind:5} {e.owner}" + (f"  found: {f.found}" if f.found else ""))
        if f.status != OK and f.advice:
            print(f"{'':20} {f.advice}")
        if e.note and f.status != OK:
            print(f"{'':20} note: {e.note}")
    counts: dict[str, int] = {}
    for f in findings:
        counts[f.status] = counts.get(f.status, 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda x: x[0] != OK))
    wrong = [f for f in findings if f.wrong]
    if wrong:
        print(
            f"{summary}: {len(wrong)} to fix (DNS changes can take the old records' TTL to be seen)"
        )
        return 1
    missing_optional = any(f.status == MISSING for f in findings)
    print(
        f"{summary}: all needed records are in place"
        + (" (optional ones may be added)" if missing_optional else "")
    )
    return 0


def _in_reactor(make: Any) -> Any:
    """Run ``make(reactor)`` (a coroutine) on the global reactor until it finishes."""
    from twisted.internet import defer
    from twisted.internet import reactor as global_reactor
    from twisted.python.failure import Failure

    reactor: Any = global_reactor

    result: list[Any] = []

    def start() -> None:
        d = defer.ensureDeferred(make(reactor))
        d.addBoth(result.append)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run(installSignalHandlers=False)
    if isinstance(result[0], Failure):
        result[0].raiseException()
    return result[0]
