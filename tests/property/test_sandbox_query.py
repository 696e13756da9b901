"""Any search text parses without error and its SQL runs against the catalog schema."""

from __future__ import annotations

import sqlite3

from hypothesis import given, settings
from hypothesis import strategies as st

from mailsuite.sandbox import catalog
from mailsuite.sandbox.query import parse, to_sql

words = st.one_of(
    st.sampled_from(
        [
            "from:",
            "to:",
            "cc:",
            "bcc:",
            "reply-to:",
            "addressed:",
            "subject:",
            "message-id:",
            "tag:",
            "after:",
            "before:",
            "larger:",
            "smaller:",
            "inbox:",
            "is:read",
            "is:unread",
            "is:tagged",
            "has:attachment",
            "has:inline",
            "-",
            "!",
            '"',
            "'",
            " ",
            "%",
            "_",
            "\\",
            "2024-01-01",
            "10k",
            "x@y",
            "Zürich",
            "\x00",
            "\n",
        ]
    ),
    st.text(max_size=8),
)

DB = sqlite3.connect(":memory:")
DB.executescript(catalog._SCHEMA)


@settings(max_examples=400, deadline=None)
@given(st.lists(words, max_size=12).map("".join), st.sampled_from([None, "UTC", "Nope/Zone"]))
def test_any_query_parses_and_runs(text: str, tz: str | None) -> None:
    terms = parse(text)
    where, params = to_sql(terms, tz)
    DB.execute(f"SELECT count(*) FROM messages WHERE {where}", params).fetchone()
