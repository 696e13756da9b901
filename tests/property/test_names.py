"""Address and mailbox-name handling under arbitrary input (hypothesis).

A mailbox name can never reach outside the user's Maildir root, and an SMTP path either
parses into something safe to write into a header or file name, or is refused with an SMTP
reply; nothing else ever escapes.
"""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from mailsuite.directory import Directory, split_address, valid_mailbox_address
from mailsuite.smtp.address import AddressError, parse_path
from mailsuite.store.mailbox import Account, MailboxError

ROOT = Path("/srv/mail/example.test/alice")
names = st.one_of(
    st.text(max_size=40),
    st.lists(
        st.sampled_from(["..", ".", "/", "~", "a", "INBOX", "\x00", "\\", "&", "b.c"]), max_size=8
    ).map("".join),
)


@settings(max_examples=500)
@given(names)
def test_mailbox_names_never_escape_the_root(name: str) -> None:
    account = Account(ROOT)
    try:
        path = account.path(name)
    except MailboxError:
        return
    assert path == ROOT or (path.parent == ROOT and path.name.startswith("."))
    assert ".." not in path.relative_to(ROOT).parts if path != ROOT else True
    assert path.name not in ("..", ".")


@settings(max_examples=300)
@given(names, names)
def test_distinct_names_get_distinct_folders(a: str, b: str) -> None:
    account = Account(ROOT)
    try:
        pa, pb = account.path(a), account.path(b)
    except MailboxError:
        return
    if a != b and not (a.upper() == "INBOX" and b.upper() == "INBOX"):
        assert pa != pb, (a, b)


@settings(max_examples=500)
@given(st.text(max_size=80), st.booleans())
def test_smtp_paths_parse_or_are_refused(text: str, utf8: bool) -> None:
    for prefix, allow_null in (("FROM:", True), ("TO:", False)):
        try:
            path = parse_path(prefix + text, prefix, allow_null=allow_null, utf8_ok=utf8)
        except AddressError as e:
            assert 500 <= e.code < 600 and e.enhanced.startswith("5.")
            continue
        # what we accept can go into a Received header, a Return-Path and a file name
        assert not any(c in path.address for c in "\r\n\x00<> \t")
        if not utf8:
            assert path.address.isascii()


@settings(max_examples=300)
@given(st.text(max_size=40), st.sampled_from(["example.test", "EXAMPLE.test"]))
def test_mailbox_roots_stay_under_the_mail_dir(local: str, domain: str) -> None:
    mail = Path("/srv/data/mail")
    d = Directory(Path("/nonexistent/directory.json"), mail, ("example.test",))
    address = f"{local}@{domain}"
    if not valid_mailbox_address(address):
        return
    root = d.mailbox_root(address)
    assert root.parent.parent == mail
    assert root.name == split_address(address)[0].lower()
    assert root.name not in ("", ".", "..")
