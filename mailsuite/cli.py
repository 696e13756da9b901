"""The ``mailsuite`` admin command: users, domains, aliases, queue, DKIM keys, DNS records,
import/export/reindex, config check.

It edits ``<data_dir>/directory.json`` under a lock; the running server re-reads it on the next
lookup, so no restart is needed.  Passwords are read without echo (or from stdin with
``--password-stdin``) and stored only as argon2id hashes.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Callable, Sequence

from mailsuite.config import SERVICES, Config, ConfigError, load_config
from mailsuite.directory import Directory, DirectoryError


def directory_of(cfg: Config) -> Directory:
    """The directory of the server ``cfg`` configures (also how the test harness adds users)."""
    return Directory(cfg.directory_file, cfg.mail_dir, cfg.local_domains)


def _read_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        line = sys.stdin.readline()
        password = line.rstrip("\r\n")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            raise DirectoryError("the two passwords differ; nothing was changed")
    if len(password) < 8:
        raise DirectoryError("the password must have at least 8 characters; nothing was changed")
    return password


def cmd_user(cfg: Config, args: argparse.Namespace) -> int:
    from mailsuite.auth import hash_password

    d = directory_of(cfg)
    if args.action == "add":
        root = d.add_user(args.address, hash_password(_read_password(args)))
        print(f"added {args.address.lower()} (mail in {root})")
    elif args.action == "passwd":
        d.set_password(args.address, hash_password(_read_password(args)))
        print(f"password of {args.address.lower()} changed")
    elif args.action == "del":
        root = d.mailbox_root(args.address)
        d.del_user(args.address)
        print(f"removed {args.address.lower()}; its mail is kept in {root} (delete it by hand)")
    elif args.action == "list":
        for user in d.users():
            print(user)
    elif args.action == "quota":
        return _user_quota(cfg, d, args)
    elif args.action == "send-as":
        d.set_send_as(args.address, args.addresses)
        print(f"{args.address.lower()} may send as: " + ", ".join(sorted(d.send_as(args.address))))
    return 0


def _apply_quota(cfg: Config, d: Directory, user: str) -> str:
    """Make the user's quota file agree with the directory (recount once when a limit is
    set: from then on usage is counted as mail comes and goes); a line for the person."""
    from mailsuite.ownership import like_data_dir
    from mailsuite.store import quota

    limit, messages = d.quota_limit(user), d.message_limit(user)
    root = d.mailbox_root(user)
    usage = quota.ensure(root, limit, messages) if root.is_dir() else None
    like_data_dir(cfg.data_dir, [root / quota.FILE_NAME])
    if usage is None:
        return f"{user}: no limit"
    size = quota.format_size
    used = (
        f"{size(usage.bytes)} of {size(limit)} used ({usage.bytes * 100 // limit}%)"
        if limit
        else f"{size(usage.bytes)} used (no size limit)"
    )
    count = f"{usage.messages} of {messages} messages" if messages else f"{usage.messages} messages"
    return f"{user}: {used}, {count}"


def _set_limits(
    args: argparse.Namespace, setter: Callable[[int | None, bool], object], default_ok: bool
) -> None:
    """Apply ``SIZE`` and ``--messages N`` from the command line through ``setter(limit,
    messages)``; ``default`` (users only) goes back to the domain's setting."""
    from mailsuite.store.quota import parse_size

    for text, messages in ((args.size, False), (args.messages, True)):
        if text is None:
            continue
        if default_ok and text.lower() == "default":
            setter(None, messages)
        elif messages:
            if not text.isdigit():
                raise DirectoryError(f"--messages {text!r}: give a number (0 = none)")
            setter(int(text), True)
        else:
            try:
                setter(parse_size(text), False)
            except ValueError as e:
                raise DirectoryError(str(e)) from None


def _user_quota(cfg: Config, d: Directory, args: argparse.Namespace) -> int:
    from mailsuite.store.quota import format_size

    user = args.address.lower()
    _set_limits(args, lambda n, m: d.set_user_quota(user, n, messages=m), default_ok=True)
    _, domain = user.rsplit("@", 1)
    own, own_messages = d.user_quota(user), d.user_quota(user, "quota_messages")
    source = [
        (
            "own size limit"
            if own is not None
            else f"size: default of {domain} ({format_size(d.domain_quota(domain))})"
        ),
        (
            "own message limit"
            if own_messages is not None
            else f"messages: default of {domain} ({d.domain_quota(domain, True)})"
        ),
    ]
    print(f"{_apply_quota(cfg, d, user)} [{'; '.join(source)}]")
    return 0


def _domain_quota(cfg: Config, d: Directory, args: argparse.Namespace) -> int:
    from mailsuite.store.quota import format_size

    domain = args.domain.lower()
    users: list[str] = []

    def setter(n: int | None, messages: bool) -> None:
        users[:] = d.set_domain_quota(domain, n or 0, messages=messages)

    _set_limits(args, setter, default_ok=False)
    print(
        f"{domain}: default limits {format_size(d.domain_quota(domain))}, "
        f"{d.domain_quota(domain, True)} messages (0 = none)"
    )
    for user in sorted(users):
        print(_apply_quota(cfg, d, user))
    return 0


def cmd_alias(cfg: Config, args: argparse.Namespace) -> int:
    d = directory_of(cfg)
    if args.action == "add":
        d.add_alias(args.alias, args.targets)
        print(f"{args.alias.lower()} -> " + ", ".join(d.aliases()[args.alias.lower()]))
    elif args.action == "del":
        d.del_alias(args.alias, args.targets)
        print(
            f"removed {args.alias.lower()}"
            + (" " + ", ".join(args.targets) if args.targets else "")
        )
    elif args.action == "list":
        for alias, targets in d.aliases().items():
            print(f"{alias} -> {', '.join(targets)}")
    return 0


def cmd_domain(cfg: Config, args: argparse.Namespace) -> int:
    d = directory_of(cfg)
    if args.action == "add":
        d.add_domain(args.domain)
        print(f"added domain {args.domain.lower()}")
    elif args.action == "del":
        d.del_domain(args.domain)
        print(f"removed domain {args.domain.lower()}")
    elif args.action == "quota":
        return _domain_quota(cfg, d, args)
    elif args.action == "list":
        for name in d.domains():
            origin = "config" if name in cfg.local_domains else "directory"
            print(f"{name}\t({origin})")
    return 0


def cmd_check(cfg: Config, args: argparse.Namespace) -> int:
    print(f"config: {cfg.where}")
    print(f"hostname: {cfg.hostname}")
    print(f"data: {cfg.data_dir}")
    d = directory_of(cfg)
    print(f"domains: {', '.join(d.domains()) or '(none)'}")
    print(f"users: {len(d.users())}")
    for service in SERVICES:
        for desc in cfg.listen.get(service, ()):
            print(f"listen {service:12} {desc}")
    if cfg.tls:
        from mailsuite.tls import ServerTLS, TLSConfigError

        try:
            served = ServerTLS([(p.cert, p.key) for p in cfg.tls], check_interval=None)
        except TLSConfigError as e:
            raise ConfigError(f"{cfg.where}: [tls] {e.which}: {e}") from None
        print(f"tls: {served.describe()}")
    else:
        print(f"tls: none configured (a self-signed certificate is made in {cfg.data_dir}/tls)")
    if cfg.relay.trusted_networks:
        print("relay for: " + ", ".join(str(n) for n in cfg.relay.trusted_networks))
    for route in cfg.relay.routes:  # the smarthost is the "*" route
        auth = f", AUTH as {route.user}" if route.user else ""
        print(f"route {route.pattern:12} -> {route.next_hop} (TLS {route.tls}{auth})")
    print("ok")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mailsuite", description="Manage a mailsuite server.")
    p.add_argument("--config", "-c", help="TOML config file (default: the embedded default)")
    sub = p.add_subparsers(dest="command", required=True)

    u = sub.add_parser("user", help="add, change, remove and list users")
    us = u.add_subparsers(dest="action", required=True)
    for action, helptext in (("add", "add a user"), ("passwd", "change a password")):
        a = us.add_parser(action, help=helptext)
        a.add_argument("address")
        a.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    us.add_parser("del", help="remove a user (keeps the mail)").add_argument("address")
    us.add_parser("list", help="list users")
    uq = us.add_parser(
        "quota",
        help="show or set a user's storage limit (20K, 500M, 1G; 0 = none; "
        "default = the domain's) and message limit (--messages N)",
    )
    uq.add_argument("address")
    uq.add_argument("size", nargs="?")
    uq.add_argument(
        "--messages", help="the most messages the user may keep (0 = none; default = the domain's)"
    )
    sa = us.add_parser("send-as", help="set the extra addresses a user may send as")
    sa.add_argument("address")
    sa.add_argument("addresses", nargs="*")
    u.set_defaults(run=cmd_user)

    a = sub.add_parser("alias", help="add, remove and list aliases (@domain = catch-all)")
    as_ = a.add_subparsers(dest="action", required=True)
    aa = as_.add_parser("add", help="alias ADDRESS to one or more TARGETS")
    aa.add_argument("alias")
    aa.add_argument("targets", nargs="+")
    ad = as_.add_parser("del", help="remove an alias, or some of its targets")
    ad.add_argument("alias")
    ad.add_argument("targets", nargs="*")
    as_.add_parser("list", help="list aliases")
    a.set_defaults(run=cmd_alias)

    d = sub.add_parser("domain", help="add, remove and list local domains")
    ds = d.add_subparsers(dest="action", required=True)
    ds.add_parser("add").add_argument("domain")
    ds.add_parser("del").add_argument("domain")
    ds.add_parser("list")
    dq = ds.add_parser("quota", help="show or set the default limits of the domain's users")
    dq.add_argument("domain")
    dq.add_argument("size", nargs="?")
    dq.add_argument("--messages", help="the most messages each user may keep (0 = none)")
    d.set_defaults(run=cmd_domain)

    c = sub.add_parser("check", help="validate the config and show what will listen where")
    c.set_defaults(run=cmd_check)

    from mailsuite.mailauth import cli as mailauth_cli

    k = sub.add_parser("dkim", help="DKIM keys: make, list, choose which one signs")
    mailauth_cli.add_dkim_arguments(k)
    k.set_defaults(run=mailauth_cli.run_dkim)

    n = sub.add_parser("dns", help="the DNS records a domain needs, and a check of them")
    mailauth_cli.add_dns_arguments(n)
    n.set_defaults(run=mailauth_cli.run_dns)

    from mailsuite.queue import cli as queue_cli

    q = sub.add_parser("queue", help="list, show, flush, delete and bounce queued mail")
    queue_cli.add_arguments(q)
    q.set_defaults(run=queue_cli.run)

    from mailsuite.sieve import cli as sieve_cli

    s = sub.add_parser("sieve", help="users' filter scripts: list, get, put, activate, log")
    sieve_cli.add_arguments(s)
    s.set_defaults(run=sieve_cli.run)

    from mailsuite.transfer import cli as transfer_cli

    transfer_cli.add_arguments(sub)

    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config)
        return int(args.run(cfg, args))
    except (ConfigError, DirectoryError) as e:
        print(f"mailsuite: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
