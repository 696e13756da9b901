"""Mailpit's search syntax in the sandbox: terms, quoting, negation, and the SQL they become,
run against the real catalog schema in memory."""

from __future__ import annotations

import json
import sqlite3

import pytest

from mailsuite.sandbox import catalog, query
from mailsuite.sandbox.query import Term, parse, split_args, to_sql


def test_split_keeps_quoted_phrases_together_without_quotes() -> None:
    assert split_args('subject:"hello world" from:bob') == ["subject:hello world", "from:bob"]
    assert split_args("'two words'  x") == ["two words", "x"]
    assert split_args("") == []


def test_terms_prefixes_negation_and_free_text() -> None:
    assert parse('from:Bob -subject:"Weekly News" is:unread !has:attachment hello') == [
        Term("from", "bob"),
        Term("subject", "weekly news", True),
        Term("is", "unread"),
        Term("is", "attachment", True),
        Term("text", "hello"),
    ]
    # Mailpit ignores terms without a letter or digit, and empty prefixes
    assert parse("!!! -- to: <>") == []
    assert parse("inbox:Alice tag:Urgent") == [Term("inbox", "alice"), Term("tag", "urgent")]


def _db() -> sqlite3.Connection:
    db = sqlite3.connect(":memory:")
    db.executescript(catalog._SCHEMA)
    return db


def _insert(db: sqlite3.Connection, mid: str, **values: object) -> None:
    row = {
        "id": mid,
        "inbox": "default",
        "uid": 1,
        "base": mid,
        "created": 1_700_000_000_000,
        "size": 1000,
        "read": 0,
        "message_id": f"{mid}@x",
        "subject": "",
        "from_json": "{}",
        "to_json": "[]",
        "cc_json": "[]",
        "bcc_json": "[]",
        "reply_to_json": "[]",
        "return_path": "",
        "username": "",
        "tags_json": "[]",
        "attachments": 0,
        "inline": 0,
        "snippet": "",
        "links_json": "[]",
        "codes_json": "[]",
        "search_text": "",
    }
    row.update(values)
    db.execute(
        f"INSERT INTO messages ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
        list(row.values()),
    )


def _ids(db: sqlite3.Connection, q: str, tz: str | None = None) -> set[str]:
    where, params = to_sql(parse(q), tz)
    return {r[0] for r in db.execute(f"SELECT id FROM messages WHERE {where}", params)}


@pytest.fixture
def db() -> sqlite3.Connection:
    d = _db()
    _insert(
        d,
        "a",
        subject="Weekly news",
        read=1,
        size=500,
        from_json=json.dumps({"Name": "Bob", "Address": "bob@example.org"}),
        to_json=json.dumps([{"Name": "", "Address": "alice@example.com"}]),
        search_text="bob weekly news hello 100%",
        tags_json='["Urgent"]',
    )
    _insert(
        d,
        "b",
        subject="Invoice",
        attachments=2,
        size=50_000,
        inbox="alice",
        from_json=json.dumps({"Name": "Shop", "Address": "shop@example.net"}),
        cc_json=json.dumps([{"Name": "Carol", "Address": "carol@example.com"}]),
        created=1_700_100_000_000,
        search_text="shop invoice attached",
    )
    return d


def test_address_subject_flags_and_text(db: sqlite3.Connection) -> None:
    assert _ids(db, "from:bob") == {"a"}
    assert _ids(db, "-from:bob") == {"b"}
    assert _ids(db, "to:alice@example.com") == {"a"}
    assert _ids(db, "addressed:carol") == {"b"}
    assert _ids(db, 'subject:"weekly news"') == {"a"}
    assert _ids(db, "is:read") == {"a"}
    assert _ids(db, "is:unread has:attachments") == {"b"}
    assert _ids(db, "tag:urgent") == {"a"} and _ids(db, "is:tagged") == {"a"}
    assert _ids(db, "hello") == {"a"} and _ids(db, "HELLO") == {"a"}
    assert _ids(db, "inbox:alice") == {"b"}
    assert _ids(db, "larger:10k") == {"b"} and _ids(db, "smaller:1kb") == {"a"}
    assert _ids(db, "") == {"a", "b"}


def test_like_wildcards_in_terms_are_literal(db: sqlite3.Connection) -> None:
    assert _ids(db, "100%") == {"a"}
    assert _ids(db, "1_0") == set()  # "_" is not "any character"
    assert _ids(db, "h%o") == set()  # "%" is not "anything"
    assert _ids(db, "0%") == {"a"}  # but a literal % matches


def test_dates_in_a_time_zone(db: sqlite3.Connection) -> None:
    # a was received 2023-11-14 22:13:20 UTC, b a day later
    assert _ids(db, "after:2023-11-15", "UTC") == {"b"}
    assert _ids(db, "before:2023-11-15", "UTC") == {"a"}
    assert _ids(db, "after:2023-11-15", "Pacific/Auckland") == {"a", "b"}
    assert _ids(db, "before:not-a-date") == {"a", "b"}  # ignored, as Mailpit does


def test_sizes() -> None:
    assert query.size_bytes("10k") == 10240
    assert query.size_bytes("1.5MB") == 1572864
    assert query.size_bytes("300") == 300
    assert query.size_bytes("12 gb") == 0
