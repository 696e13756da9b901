"""``mailsuite sieve list|get|put|activate|deactivate|check|log ADDR [NAME] [FILE]``.

For administrators: the same script store ManageSieve uses (the running server sees changes
at the next delivery, no restart).  ``put`` and ``check`` refuse a script that does not
compile and say the line and why; they read FILE, or stdin for ``-`` (``check`` without
FILE checks the stored script NAME).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mailsuite.config import Config
from mailsuite.directory import Directory, DirectoryError, normalize
from mailsuite.ownership import like_data_dir
from mailsuite.sieve.grammar import SieveParseError
from mailsuite.sieve.storage import ScriptError, ScriptStore
from mailsuite.sieve.validate import compile_script

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    ss = p.add_subparsers(dest="action", required=True)
    ss.add_parser("list", help="a user's scripts (the active one marked)").add_argument("address")
    g = ss.add_parser("get", help="print a script")
    g.add_argument("address")
    g.add_argument("name")
    put = ss.add_parser("put", help="store a script from FILE ('-': stdin), checked first")
    put.add_argument("address")
    put.add_argument("name")
    put.add_argument("file")
    put.add_argument("--activate", action="store_true", help="make it the active script")
    a = ss.add_parser("activate", help="make a script the one run at delivery")
    a.add_argument("address")
    a.add_argument("name")
    ss.add_parser("deactivate", help="run no script for this user").add_argument("address")
    c = ss.add_parser("check", help="check the stored script NAME, or FILE ('-': stdin)")
    c.add_argument("address")
    c.add_argument("name")
    c.add_argument("file", nargs="?", help="check this file instead of the stored script")
    ss.add_parser("log", help="the user's filter errors (scripts that failed)").add_argument(
        "address"
    )


def _store(cfg: Config, address: str) -> ScriptStore:
    d = Directory(cfg.directory_file, cfg.mail_dir, cfg.local_domains)
    try:
        user = normalize(address)
    except ValueError as e:
        raise DirectoryError(str(e)) from None
    if user not in d.users():
        raise DirectoryError(f"{user} is not a user here")
    return ScriptStore(d.mailbox_root(user), cfg.sieve.max_scripts, cfg.sieve.max_script_size)


def _read(path: str) -> str:
    data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ScriptError(f"{path}: not UTF-8 text (Sieve scripts are UTF-8)") from None


def _check(cfg: Config, text: str, what: str) -> bool:
    try:
        compile_script(text, cfg.sieve.max_script_size)
    except SieveParseError as e:
        print(f"mailsuite sieve: {what}: {e}", file=sys.stderr)
        return False
    return True


def run(cfg: Config, args: argparse.Namespace) -> int:
    try:
        store = _store(cfg, args.address)
        action = args.action
        if action == "list":
            active = store.active()
            for name in store.names():
                print(f"{name}\t(active)" if name == active else name)
        elif action == "get":
            sys.stdout.write(store.read(args.name))
        elif action == "put":
            text = _read(args.file)
            if not _check(cfg, text, args.file):
                return 1
            store.put(args.name, text)
            if args.activate:
                store.activate(args.name)
            _own(cfg, store)
            print(f"stored {args.name}" + (" (active)" if args.activate else ""))
        elif action == "activate":
            if not _check(cfg, store.read(args.name), args.name):
                return 1
            store.activate(args.name)
            _own(cfg, store)
            print(f"{args.name} is active")
        elif action == "deactivate":
            store.activate(None)
            print("no script is active")
        elif action == "check":
            text = _read(args.file) if args.file else store.read(args.name)
            if not _check(cfg, text, args.file or args.name):
                return 1
            print("ok")
        elif action == "log":
            sys.stdout.write(store.read_log() or "")
    except ScriptError as e:
        print(f"mailsuite sieve: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"mailsuite sieve: {e}", file=sys.stderr)
        return 1
    return 0


def _own(cfg: Config, store: ScriptStore) -> None:
    """Files written as root belong to the server's account (see mailsuite.ownership)."""
    like_data_dir(cfg.data_dir, [store.dir], tree=True)
    like_data_dir(cfg.data_dir, [store.link])
