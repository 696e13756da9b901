"""``mailsuite import``, ``export`` and ``reindex``: argument parsing and reporting.

Progress goes to stderr (a redrawn line on a terminal, plain lines otherwise), results to stdout.
Run as root, files made for the server's mailboxes are handed to the data folder's owner (the
account the server runs as), also when the command is interrupted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mailsuite.config import Config
from mailsuite.directory import Directory, DirectoryError, normalize
from mailsuite.ownership import like_data_dir
from mailsuite.store import quota
from mailsuite.store.mailbox import Account, MailboxError
from mailsuite.store.reindex import count_files, reindex_account
from mailsuite.transfer.exporter import export_account
from mailsuite.transfer.importer import Importer, ImportOverQuota
from mailsuite.transfer.progress import Progress
from mailsuite.transfer.sources import MBOX_VARIANTS, SourceError, open_source

_ACTIONS = {
    "checked": "checked, UIDs kept",
    "rebuilt": "rebuilt, new UIDVALIDITY",
    "replaced": "index was damaged: replaced, new UIDVALIDITY",
}


def _mailbox_root(cfg: Config, address: str) -> tuple[str, Path]:
    directory = Directory(cfg.directory_file, cfg.mail_dir, cfg.local_domains)
    try:
        user = normalize(address)
    except ValueError as e:
        raise DirectoryError(str(e)) from None
    if user not in directory.users():
        raise DirectoryError(f"{user} is not a user here (add it with 'mailsuite user add')")
    return user, directory.mailbox_root(user)


def cmd_import(cfg: Config, args: argparse.Namespace) -> int:
    user, root = _mailbox_root(cfg, args.address)
    try:
        source = open_source(Path(args.path).expanduser(), args.mbox)
        progress = Progress("import", sys.stderr, source.total_messages, source.total_bytes)
        try:
            result = Importer(root, progress, args.folder, check_quota=not args.ignore_quota).run(
                source
            )
        except ImportOverQuota as e:
            print(progress.finish(), file=sys.stderr)
            u = e.usage
            print(
                f"mailsuite: import into {user} stopped after {e.result.imported} messages:"
                f" the next ({e.size:,} bytes) would exceed the quota"
                f" ({quota.format_size(u.bytes)} of {quota.format_size(u.limit)} used,"
                f" {u.messages} messages of {u.max_messages or 'any number'});"
                f" raise it with 'mailsuite user quota {user} SIZE' and run the same"
                " command again to import the rest, or pass --ignore-quota",
                file=sys.stderr,
            )
            return 1
        except KeyboardInterrupt:
            print(progress.finish(), file=sys.stderr)
            print("interrupted: run the same command again to import the rest", file=sys.stderr)
            raise
        finally:
            like_data_dir(cfg.data_dir, [root], tree=True)
    except (SourceError, MailboxError, OSError) as e:
        print(f"mailsuite: import into {user} failed: {e}", file=sys.stderr)
        return 1
    print(progress.finish())
    line = f"into {user}: {', '.join(result.folders) or '(nothing)'}"
    if result.created:
        line += f" (created: {', '.join(result.created)})"
    print(line)
    return 0


def cmd_export(cfg: Config, args: argparse.Namespace) -> int:
    user, root = _mailbox_root(cfg, args.address)
    progress = Progress("export", sys.stderr)
    try:
        result = export_account(root, Path(args.dir).expanduser(), progress)
    except (SourceError, MailboxError, OSError) as e:
        print(f"mailsuite: export of {user} failed: {e}", file=sys.stderr)
        return 1
    print(progress.finish())
    print(f"{user} -> {args.dir}: {len(result.folders)} folders ({', '.join(result.folders)})")
    if result.vanished:
        print(f"{result.vanished} messages were deleted while the export ran and are not in it")
    return 0


def cmd_reindex(cfg: Config, args: argparse.Namespace) -> int:
    directory = Directory(cfg.directory_file, cfg.mail_dir, cfg.local_domains)
    if args.address:
        roots = [_mailbox_root(cfg, args.address)]
    else:
        roots = [(user, directory.mailbox_root(user)) for user in directory.users()]
    roots = [(user, root) for user, root in roots if root.is_dir()]
    total = sum(
        count_files(Account(root).path(name)) for _, root in roots for name in Account(root).names()
    )
    progress = Progress("reindex", sys.stderr, total_messages=total)
    try:
        for user, root in roots:
            try:
                reports = reindex_account(root, args.rebuild, progress.advance)
                limit, messages = directory.quota_limit(user), directory.message_limit(user)
                if limit or messages:  # the quota usage is recounted too (mailsuite.store.quota)
                    quota.recount(root, limit, messages)
                else:
                    quota.remove_limit(root)
            finally:
                like_data_dir(cfg.data_dir, [root], tree=True)
            for r in reports:
                print(
                    f"{user} {r.name}: {r.messages:,} messages, UIDVALIDITY {r.uidvalidity}"
                    f" ({_ACTIONS[r.action]})"
                )
    except (MailboxError, OSError) as e:
        print(f"mailsuite: reindex failed: {e}", file=sys.stderr)
        return 1
    print(progress.finish())
    return 0


def add_arguments(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``import``, ``export`` and ``reindex`` on the ``mailsuite`` command."""
    i = sub.add_parser(
        "import",
        help="import an mbox file or a Maildir/Maildir++ tree into a user's mailbox",
        description="Import mail with its flags, dates and folders.  Running it again "
        "imports only what is missing (a record is kept in each folder).",
    )
    i.add_argument("address", help="the user to import into")
    i.add_argument("path", help="an mbox file, or a Maildir (with .Folder subfolders)")
    i.add_argument(
        "--folder",
        help="folder for the source's INBOX (its other folders go below it); default: INBOX",
    )
    i.add_argument(
        "--mbox",
        choices=MBOX_VARIANTS,
        default="mboxrd",
        help="how body lines starting with 'From ' were quoted (default mboxrd)",
    )
    i.add_argument(
        "--ignore-quota",
        action="store_true",
        help="import everything even past the user's quota (the usage is still counted)",
    )
    i.set_defaults(run=cmd_import)

    e = sub.add_parser("export", help="write a user's mail as a Maildir++ tree")
    e.add_argument("address")
    e.add_argument("dir", help="a folder that does not exist yet (or is empty)")
    e.set_defaults(run=cmd_export)

    r = sub.add_parser(
        "reindex",
        help="check and rebuild mailbox indexes",
        description="Bring each folder's index in step with its files (UIDs kept); an index "
        "that is damaged, or every index with --rebuild, is made again under a new "
        "UIDVALIDITY (clients download the folder again).",
    )
    r.add_argument("address", nargs="?", help="one user (default: every user)")
    r.add_argument("--rebuild", action="store_true", help="rebuild from the files, new UIDs")
    r.set_defaults(run=cmd_reindex)
