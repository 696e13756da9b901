"""The sandbox catalog: one row per captured message, for listing, searching and waiting.

The messages live in the inboxes' Maildir folders (the store IMAP and POP3 read); the catalog
is a cache beside them, ``<data_dir>/sandbox-catalog.sqlite``, holding what the API shows
without opening a file: Mailpit's summary fields, links, codes and the search text.  It follows
the folders through their indexes (:class:`mailsuite.store.index.FolderIndex`): a sync picks up
messages that arrived, were removed or changed their ``\\Seen`` flag, from any protocol or
process, and enforces ``[sandbox] max_messages`` (the oldest go first).  Read state and
deletions made here go through the same index, so IMAP and POP3 see them.

IDs are derived from the inbox and the Maildir unique name (22 letters and digits, like
Mailpit's), so a lost catalog is rebuilt with the same IDs.

Blocking (SQLite, files): every method runs in the sandbox's one worker thread, which also
owns the connection and the open folder indexes, so no two calls ever overlap.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mailsuite.sandbox import extract, mime, query
from mailsuite.sandbox.inboxes import DEFAULT_INBOX, SandboxDirectory
from mailsuite.store.index import FolderIndex, Message

CATALOG_NAME = "sandbox-catalog.sqlite"
_VERSION = 1
_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_MAX_PARAMS = 900

_SCHEMA = """
CREATE TABLE IF NOT EXISTS inboxes (name TEXT PRIMARY KEY, uidvalidity INTEGER NOT NULL,
                                    modseq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY, inbox TEXT NOT NULL, uid INTEGER NOT NULL, base TEXT NOT NULL,
    created INTEGER NOT NULL,       -- milliseconds since the epoch (delivery time)
    size INTEGER NOT NULL, read INTEGER NOT NULL,
    message_id TEXT NOT NULL, subject TEXT NOT NULL,
    from_json TEXT NOT NULL, to_json TEXT NOT NULL, cc_json TEXT NOT NULL,
    bcc_json TEXT NOT NULL, reply_to_json TEXT NOT NULL,
    return_path TEXT NOT NULL, username TEXT NOT NULL, tags_json TEXT NOT NULL,
    attachments INTEGER NOT NULL, inline INTEGER NOT NULL, snippet TEXT NOT NULL,
    links_json TEXT NOT NULL, codes_json TEXT NOT NULL, search_text TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_inbox_uid ON messages(inbox, uid);
CREATE INDEX IF NOT EXISTS messages_created ON messages(created);
"""

_COLUMNS = (
    "id, inbox, uid, created, size, read, message_id, subject, from_json, to_json, cc_json, "
    "bcc_json, reply_to_json, return_path, username, tags_json, attachments, inline, snippet, "
    "links_json, codes_json"
)


def message_id_for(inbox: str, base: str) -> str:
    """The API ID of a message: 22 base-62 digits of a hash of its inbox and file name."""
    n = int.from_bytes(hashlib.sha256(f"{inbox}\x00{base}".encode()).digest()[:16], "big")
    out = []
    for _ in range(22):
        n, r = divmod(n, 62)
        out.append(_ALPHABET[r])
    return "".join(out)


def rfc3339(ms: int) -> str:
    """Go's time.Time JSON form (what Mailpit's ``Created`` and ``Date`` look like)."""
    when = datetime.fromtimestamp(ms / 1000, UTC).astimezone()
    text = when.isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def summary_of(row: Sequence[Any]) -> dict[str, Any]:
    """Mailpit's ``MessageSummary`` (plus ``Inbox``, ``Links``, ``Codes``) from a row
    selected with :data:`_COLUMNS`."""
    (
        mid,
        inbox,
        _uid,
        created,
        size,
        read,
        message_id,
        subject,
        from_json,
        to_json,
        cc_json,
        bcc_json,
        reply_to_json,
        _return_path,
        username,
        tags_json,
        attachments,
        _inline,
        snippet,
        links_json,
        codes_json,
    ) = row
    return {
        "ID": mid,
        "MessageID": message_id,
        "Read": bool(read),
        "From": json.loads(from_json),
        "To": json.loads(to_json),
        "Cc": json.loads(cc_json),
        "Bcc": json.loads(bcc_json),
        "ReplyTo": json.loads(reply_to_json),
        "Subject": subject,
        "Created": rfc3339(created),
        "Username": username,
        "Tags": json.loads(tags_json),
        "Size": size,
        "Attachments": attachments,
        "Snippet": snippet,
        "Inbox": inbox,
        "Links": json.loads(links_json),
        "Codes": json.loads(codes_json),
    }


@dataclass
class Changes:
    """What a call found or did, for the events and for IMAP/POP3 sessions."""

    new: list[dict[str, Any]] = field(default_factory=list)  # summaries, oldest first
    deleted: list[tuple[str, str]] = field(default_factory=list)  # (ID, inbox)
    read: list[tuple[str, str, bool]] = field(default_factory=list)  # (ID, inbox, read)
    folders: set[Path] = field(default_factory=set)  # Maildir folders changed here

    def __bool__(self) -> bool:
        return bool(self.new or self.deleted or self.read or self.folders)


@dataclass(frozen=True)
class Located:
    """A message found by ID: its catalog row (summary) and its file."""

    summary: dict[str, Any]
    path: Path
    return_path: str


class Catalog:
    def __init__(self, data_dir: Path, directory: SandboxDirectory, max_messages: int) -> None:
        self.path = data_dir / CATALOG_NAME
        self.directory = directory
        self.max_messages = max_messages
        self._db: sqlite3.Connection | None = None
        self._indexes: dict[str, FolderIndex] = {}
        #: what every call found (a listing's sync too) or did, until :meth:`take_changes`:
        #: the service publishes it after each call, so no change goes unannounced
        self.changes = Changes()

    # -- connection and indexes ------------------------------------------------------------

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            db = sqlite3.connect(self.path, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # a cache: rebuilt from the folders
            if db.execute("PRAGMA user_version").fetchone()[0] != _VERSION:
                db.executescript("DROP TABLE IF EXISTS messages; DROP TABLE IF EXISTS inboxes;")
                db.execute(f"PRAGMA user_version={_VERSION}")
            db.executescript(_SCHEMA)
            self._db = db
        return self._db

    def close(self) -> None:
        for index in self._indexes.values():
            index.close()
        self._indexes.clear()
        if self._db is not None:
            self._db.close()
            self._db = None

    def _index(self, inbox: str) -> FolderIndex | None:
        """The open index of ``inbox``, or None when its folder does not exist."""
        root = self.directory.mailbox_root(inbox)
        index = self._indexes.get(inbox)
        if not (root / "cur").is_dir():
            if index is not None:
                index.close()
                del self._indexes[inbox]
            return None
        if index is None:
            index = self._indexes[inbox] = FolderIndex(root)
        return index

    # -- following the folders -------------------------------------------------------------

    def take_changes(self) -> Changes:
        """What the calls since the last take found or did (see :attr:`changes`)."""
        changes, self.changes = self.changes, Changes()
        return changes

    def sync(self, inboxes: Iterable[str] | None = None) -> None:
        """Bring the catalog in step with ``inboxes`` (None: every inbox, and forget inboxes
        whose folder is gone); cheap when nothing changed."""
        changes = self.changes
        if inboxes is None:
            names = set(self.directory.inboxes())
            known = {n for (n,) in self.db.execute("SELECT name FROM inboxes")}
            for gone in sorted(known - names):
                self._forget_inbox(gone, changes)
            inboxes = sorted(names)
        for name in inboxes:
            self._sync_inbox(name, changes)

    def _forget_inbox(self, inbox: str, changes: Changes) -> None:
        rows = self.db.execute("SELECT id FROM messages WHERE inbox=?", (inbox,)).fetchall()
        changes.deleted.extend((mid, inbox) for (mid,) in rows)
        with self._transaction():
            self.db.execute("DELETE FROM messages WHERE inbox=?", (inbox,))
            self.db.execute("DELETE FROM inboxes WHERE name=?", (inbox,))

    def _sync_inbox(self, inbox: str, changes: Changes) -> None:
        index = self._index(inbox)
        if index is None:
            self._forget_inbox(inbox, changes)
            return
        index.sync()
        uidvalidity, _, modseq = index.counters()
        meta = self.db.execute(
            "SELECT uidvalidity, modseq FROM inboxes WHERE name=?", (inbox,)
        ).fetchone()
        if meta is not None and tuple(meta) == (uidvalidity, modseq):
            return
        if meta is not None and meta[0] == uidvalidity:
            rows, gone = index.changes_since(meta[1])
            self._apply(inbox, index, rows, gone, changes)
        else:
            self._rescan(inbox, index, changes)
        self._trim(inbox, index, changes)
        _, _, modseq = index.counters()
        self.db.execute(
            "INSERT OR REPLACE INTO inboxes(name, uidvalidity, modseq) VALUES (?, ?, ?)",
            (inbox, uidvalidity, modseq),
        )

    def _apply(
        self,
        inbox: str,
        index: FolderIndex,
        rows: list[tuple[int, str, int]],
        gone: list[int],
        changes: Changes,
    ) -> None:
        known: dict[int, tuple[str, int]] = {}
        uids = [u for u, _, _ in rows] + list(gone)
        for chunk in _chunks(uids):
            for mid, uid, read in self.db.execute(
                f"SELECT id, uid, read FROM messages WHERE inbox=? AND uid IN "
                f"({','.join('?' * len(chunk))})",
                [inbox, *chunk],
            ):
                known[uid] = (mid, read)
        with self._transaction():
            for uid in gone:
                if uid in known:
                    mid = known.pop(uid)[0]
                    self.db.execute("DELETE FROM messages WHERE id=?", (mid,))
                    changes.deleted.append((mid, inbox))
            added = []
            for uid, flags, _ in rows:
                seen = "\\Seen" in flags.split()
                if uid not in known:
                    added.append(uid)
                elif bool(known[uid][1]) != seen:
                    mid = known[uid][0]
                    self.db.execute("UPDATE messages SET read=? WHERE id=?", (int(seen), mid))
                    changes.read.append((mid, inbox, seen))
            for uid in added:
                msg = index.get(uid)
                if msg is not None:
                    self._add(inbox, index, msg, changes)

    def _rescan(self, inbox: str, index: FolderIndex, changes: Changes) -> None:
        """A new inbox, or its index was rebuilt (new UIDVALIDITY): compare by file name."""
        messages = {m.base: m for m in index.messages()}
        existing = {
            base: (mid, read)
            for mid, base, read in self.db.execute(
                "SELECT id, base, read FROM messages WHERE inbox=?", (inbox,)
            )
        }
        with self._transaction():
            for base, (mid, _) in existing.items():
                if base not in messages:
                    self.db.execute("DELETE FROM messages WHERE id=?", (mid,))
                    changes.deleted.append((mid, inbox))
            for base, msg in sorted(messages.items(), key=lambda kv: kv[1].uid):
                if base in existing:
                    mid, read = existing[base]
                    seen = "\\Seen" in msg.flags
                    self.db.execute(
                        "UPDATE messages SET uid=?, read=? WHERE id=?", (msg.uid, int(seen), mid)
                    )
                    if bool(read) != seen:
                        changes.read.append((mid, inbox, seen))
                else:
                    self._add(inbox, index, msg, changes)

    def _add(self, inbox: str, index: FolderIndex, msg: Message, changes: Changes) -> None:
        try:
            raw = index.path(msg).read_bytes()
        except FileNotFoundError:
            return  # removed meanwhile: the next sync sees it gone
        row = _row(inbox, msg, raw)
        self.db.execute(
            f"INSERT OR REPLACE INTO messages ({_COLUMNS}, base, search_text) VALUES "
            f"({','.join('?' * (len(row)))})",
            row,
        )
        summary = summary_of(row[:-2])
        changes.new.append(summary)

    def _trim(self, inbox: str, index: FolderIndex, changes: Changes) -> None:
        """``[sandbox] max_messages``: remove the oldest messages of ``inbox`` beyond it."""
        (count,) = self.db.execute(
            "SELECT count(*) FROM messages WHERE inbox=?", (inbox,)
        ).fetchone()
        if count <= self.max_messages:
            return
        oldest = self.db.execute(
            "SELECT id, uid FROM messages WHERE inbox=? ORDER BY uid LIMIT ?",
            (inbox, count - self.max_messages),
        ).fetchall()
        self._remove(inbox, index, oldest, changes)

    def _remove(
        self, inbox: str, index: FolderIndex, rows: Sequence[tuple[str, int]], changes: Changes
    ) -> None:
        if not rows:
            return
        index.expunge([uid for _, uid in rows])
        with self._transaction():
            for chunk in _chunks([mid for mid, _ in rows]):
                self.db.execute(
                    f"DELETE FROM messages WHERE id IN ({','.join('?' * len(chunk))})", chunk
                )
        gone = {mid for mid, _ in rows}
        changes.new = [s for s in changes.new if s["ID"] not in gone]
        changes.deleted.extend((mid, inbox) for mid, _ in rows)
        changes.folders.add(index.folder)

    # -- reading ---------------------------------------------------------------------------

    def listing(
        self, inbox: str | None, search: str | None, start: int, limit: int, tz: str | None = None
    ) -> dict[str, Any]:
        """Mailpit's ``MessagesSummary``: newest first, ``messages_count`` matches."""
        self.sync([inbox] if inbox is not None else None)
        where, params = self._where(inbox, search, tz)
        (matched,) = self.db.execute(
            f"SELECT count(*) FROM messages WHERE {where}", params
        ).fetchone()
        rows = self.db.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE {where} ORDER BY created DESC, rowid DESC "
            "LIMIT ? OFFSET ?",
            [*params, limit, start],
        ).fetchall()
        total, unread = self.counts(inbox)
        messages = [summary_of(r) for r in rows]
        return {
            "total": total,
            "unread": unread,
            "count": len(messages),
            "messages_count": matched,
            "messages_unread": self._unread(where, params),
            "start": start,
            "tags": self.tags(inbox),
            "messages": messages,
        }

    def _unread(self, where: str, params: list[object]) -> int:
        (n,) = self.db.execute(
            f"SELECT count(*) FROM messages WHERE ({where}) AND read = 0", params
        ).fetchone()
        return int(n)

    @staticmethod
    def _where(inbox: str | None, search: str | None, tz: str | None) -> tuple[str, list[object]]:
        where, params = query.to_sql(query.parse(search or ""), tz)
        if inbox is not None:
            where = f"inbox = ? AND ({where})"
            params = [inbox, *params]
        return where, params

    def counts(self, inbox: str | None) -> tuple[int, int]:
        """(messages, unread) of ``inbox`` or of every inbox."""
        if inbox is None:
            row = self.db.execute("SELECT count(*), coalesce(sum(read = 0), 0) FROM messages")
        else:
            row = self.db.execute(
                "SELECT count(*), coalesce(sum(read = 0), 0) FROM messages WHERE inbox=?",
                (inbox,),
            )
        total, unread = row.fetchone()
        return int(total), int(unread)

    def tags(self, inbox: str | None) -> list[str]:
        sql = "SELECT DISTINCT value FROM messages, json_each(messages.tags_json)"
        rows = (
            self.db.execute(sql + " WHERE inbox=?", (inbox,))
            if inbox is not None
            else self.db.execute(sql)
        )
        return sorted({str(v) for (v,) in rows})

    def inbox_counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for name in self.directory.inboxes():
            out[name] = {"Messages": 0, "Unread": 0}
        for inbox, total, unread in self.db.execute(
            "SELECT inbox, count(*), coalesce(sum(read = 0), 0) FROM messages GROUP BY inbox"
        ):
            out[inbox] = {"Messages": int(total), "Unread": int(unread)}
        return dict(sorted(out.items()))

    def matching(
        self, ids: Sequence[str], inbox: str | None, search: str | None, tz: str | None = None
    ) -> dict[str, Any] | None:
        """The newest of ``ids`` that matches ``search`` (in ``inbox``), for the waiters."""
        if not ids:
            return None
        where, params = self._where(inbox, search, tz)
        row = self.db.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE id IN ({','.join('?' * len(ids))}) "
            f"AND {where} ORDER BY created DESC, rowid DESC LIMIT 1",
            [*ids, *params],
        ).fetchone()
        return summary_of(row) if row is not None else None

    def locate(self, mid: str, inbox: str | None = None) -> Located | None:
        """The message ``mid`` (``latest``: the newest, of ``inbox`` when given)."""
        if mid == "latest":
            self.sync([inbox] if inbox is not None else None)
            where, params = self._where(inbox, None, None)
            row = self.db.execute(
                f"SELECT {_COLUMNS} FROM messages WHERE {where} "
                "ORDER BY created DESC, rowid DESC LIMIT 1",
                params,
            ).fetchone()
        else:
            row = self.db.execute(f"SELECT {_COLUMNS} FROM messages WHERE id=?", (mid,)).fetchone()
            if row is not None:
                self.sync([row[1]])  # still there?
                row = self.db.execute(
                    f"SELECT {_COLUMNS} FROM messages WHERE id=?", (mid,)
                ).fetchone()
        if row is None:
            return None
        index = self._index(row[1])
        msg = index.get(row[2]) if index is not None else None
        if index is None or msg is None:
            return None
        return Located(summary_of(row), index.path(msg), row[13])

    # -- changing --------------------------------------------------------------------------

    def _selected(
        self, ids: Sequence[str] | None, inbox: str | None, search: str | None = None
    ) -> dict[str, list[tuple[str, int, int]]]:
        """inbox -> [(id, uid, read)] of the messages named by ``ids`` (None: every message
        of ``inbox``, or of every inbox, matching ``search``)."""
        out: dict[str, list[tuple[str, int, int]]] = {}
        if ids is None:
            self.sync([inbox] if inbox is not None else None)
            where, params = self._where(inbox, search, None)
            rows = self.db.execute(
                f"SELECT inbox, id, uid, read FROM messages WHERE {where}", params
            ).fetchall()
        else:
            rows = []
            for chunk in _chunks(list(ids)):
                rows.extend(
                    self.db.execute(
                        "SELECT inbox, id, uid, read FROM messages WHERE id IN "
                        f"({','.join('?' * len(chunk))})",
                        chunk,
                    )
                )
        for box, mid, uid, read in rows:
            out.setdefault(box, []).append((mid, uid, read))
        return out

    def delete(
        self, ids: Sequence[str] | None, inbox: str | None, search: str | None = None
    ) -> None:
        """Remove messages (from their Maildir folders too)."""
        changes = self.changes
        for box, rows in self._selected(ids, inbox, search).items():
            index = self._index(box)
            if index is not None:
                self._remove(box, index, [(mid, uid) for mid, uid, _ in rows], changes)

    def set_read(self, ids: Sequence[str] | None, inbox: str | None, read: bool) -> None:
        """Set or clear ``\\Seen`` (in the Maildir, so IMAP and POP3 agree)."""
        changes = self.changes
        for box, rows in self._selected(ids, inbox).items():
            index = self._index(box)
            todo = [(mid, uid) for mid, uid, was in rows if bool(was) != read]
            if index is None or not todo:
                continue
            updates = []
            for _, uid in todo:
                msg = index.get(uid)
                if msg is not None:
                    flags = msg.flags | {"\\Seen"} if read else msg.flags - {"\\Seen"}
                    updates.append((uid, frozenset(flags)))
            done = {uid for uid, _, _ in index.store_flags(updates)}
            with self._transaction():
                for mid, uid in todo:
                    if uid in done:
                        self.db.execute("UPDATE messages SET read=? WHERE id=?", (int(read), mid))
                        changes.read.append((mid, box, read))
            changes.folders.add(index.folder)

    def _transaction(self) -> Any:
        return _Transaction(self.db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN")

    def __exit__(self, kind: object, value: object, tb: object) -> None:
        self.db.execute("COMMIT" if kind is None else "ROLLBACK")


def _chunks(values: list[Any]) -> Iterable[list[Any]]:
    for i in range(0, len(values), _MAX_PARAMS):
        yield values[i : i + _MAX_PARAMS]


def _row(inbox: str, msg: Message, raw: bytes) -> tuple[Any, ...]:
    """The catalog row of one message (columns of :data:`_COLUMNS`, then base and the search
    text)."""
    mail = mime.parse(raw)
    senders = mail.addresses("From")
    if senders:
        sender: dict[str, str] = senders[0]
    else:
        sender = {"Name": mail.decoded("From"), "Address": ""}
    tags = [t.strip() for t in mail.decoded("X-Tags").split(",") if t.strip()]
    html_text = extract.html_text(mail.html) if mail.html else ""
    search_parts = [
        mail.decoded(h) for h in ("From", "Subject", "To", "Cc", "Bcc", "Reply-To", "Return-Path")
    ]
    search_parts.append(html_text or mail.text)
    search_parts.extend(a.filename for a in mail.attachments)
    return (
        message_id_for(inbox, msg.base),
        inbox,
        msg.uid,
        int(msg.internaldate * 1000),
        msg.size,
        int("\\Seen" in msg.flags),
        (mail.header("Message-ID") or "").strip().strip("<>").strip(),
        mail.decoded("Subject"),
        json.dumps(sender),
        json.dumps(mail.addresses("To")),
        json.dumps(mail.addresses("Cc")),
        json.dumps(mail.addresses("Bcc")),
        json.dumps(mail.addresses("Reply-To")),
        (mail.header("Return-Path") or "").strip().strip("<>").strip(),
        "" if inbox == DEFAULT_INBOX else inbox,
        json.dumps(list(dict.fromkeys(tags))),
        len(mail.attachments),
        len(mail.inline),
        extract.snippet(mail.text, mail.html),
        json.dumps(extract.links(mail.text, mail.html)),
        json.dumps(extract.codes(mail.text, mail.html)),
        msg.base,
        query.clean(" ".join(search_parts)),
    )
