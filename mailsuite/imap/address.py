"""RFC 5322 address lists as IMAP sees them: ENVELOPE's address structures (RFC 3501 7.4.2)
and the text SEARCH FROM / TO / CC / BCC match against.  Our own lenient parser: garbage in
gives a best-effort list, never an exception.

Comments are kept while parsing and dropped from the address itself, so
``<user-from (comment)@ (comment) domain.org>`` is ``user-from@domain.org``.  A mailbox
without a display name takes its name from a comment outside the address, the RFC 822 form
``user@domain (Real Name)`` that old software and list servers still send (as Dovecot and
Cyrus do); a phrase, when present, wins.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Address", "address_text", "parse_address_list", "simple_address_list"]


@dataclass(frozen=True, slots=True)
class Address:
    """One element of an address list, with ENVELOPE's conventions: a group starts with
    ``mailbox`` = the group name and ``host`` None, and ends with every field None.
    ``null`` marks the null path ``<>``.  ``mailbox`` and ``host`` are "" when missing."""

    name: str | None = None
    route: str | None = None
    mailbox: str | None = None
    host: str | None = None
    null: bool = False

    @property
    def is_group_start(self) -> bool:
        return self.host is None and self.mailbox is not None and not self.null

    @property
    def is_group_end(self) -> bool:
        return self.mailbox is None and not self.null


_GROUP_END = Address()

# quoted string, domain literal, specials, atom (comments and whitespace are scanned by hand)
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"?|\[[^\]]*\]?|[<>,:;@.]|[^\s<>,:;@."()\[]+', re.S)
_QUOTED_PAIR = re.compile(r"\\(.)", re.S)
_SPACE = re.compile(r"\s+")

Token = tuple[str, str]  # (kind, text): kind "a" atom, "q" quoted, "c" comment, or a special


def _comment(text: str, pos: int) -> tuple[str, int]:
    """The comment opening at ``text[pos]`` (nested comments and quoted pairs allowed):
    its text and the position after it (the end of ``text`` if it never closes)."""
    depth = 0
    i = pos
    out: list[str] = []
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            out.append(text[i + 1])
            i += 2
            continue
        if ch == "(":
            depth += 1
            if depth > 1:
                out.append(ch)
        elif ch == ")":
            depth -= 1
            if depth == 0:
                return "".join(out), i + 1
            out.append(ch)
        else:
            out.append(ch)
        i += 1
    return "".join(out), i


def _tokens(text: str) -> list[Token]:
    out: list[Token] = []
    pos, n = 0, len(text)
    while pos < n:
        ch = text[pos]
        if ch.isspace():
            pos += 1
            continue
        if ch == "(":
            body, pos = _comment(text, pos)
            out.append(("c", _SPACE.sub(" ", body).strip()))
            continue
        if ch == ")":  # a stray closing parenthesis
            pos += 1
            continue
        m = _TOKEN.match(text, pos)
        if m is None:  # cannot happen: every other character starts an atom
            pos += 1
            continue
        t = m.group()
        pos = m.end()
        if t[0] == '"':
            body = t[1:-1] if len(t) > 1 and t.endswith('"') else t[1:]
            out.append(("q", _QUOTED_PAIR.sub(r"\1", body)))
        elif t in ("<", ">", ",", ":", ";", "@", "."):
            out.append((t, t))
        else:
            out.append(("a", t))
    return out


def _word_text(toks: list[Token]) -> str:
    return " ".join(v for k, v in toks if k in ("a", "q"))


def _local_text(toks: list[Token]) -> str:
    out = []
    for k, v in toks:
        if k == "q":
            needs = not v or any(c in ' ()<>,;:@."[]\\' for c in v)
            out.append('"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' if needs else v)
        elif k in ("a", "."):
            out.append(v)
    return "".join(out)


def _domain_text(toks: list[Token]) -> str:
    return "".join(v for k, v in toks if k in ("a", "."))


def _last_comment(toks: list[Token]) -> str | None:
    comments = [v for k, v in toks if k == "c" and v]
    return comments[-1] if comments else None


def _mailbox(phrase: list[Token], angle: list[Token] | None, after: list[Token]) -> Address:
    if angle is None:
        spec = phrase
        # RFC 822 style "user@domain (Real Name)": the comment names the mailbox
        name = _last_comment(phrase)
    else:
        spec = angle
        name = _word_text(phrase) or _last_comment(phrase + after)
    if angle is not None and not any(k in ("a", "q", "@") for k, _ in angle):  # <>
        return Address(name, None, "", "", null=True)
    route = None
    if spec and spec[0][0] == "@":
        colon = next((i for i, t in enumerate(spec) if t[0] == ":"), -1)
        if colon >= 0:
            route = "".join(v for k, v in spec[:colon] if k != "c")
            spec = spec[colon + 1 :]
    at = max((i for i, t in enumerate(spec) if t[0] == "@"), default=-1)
    if at >= 0:
        local, domain = _local_text(spec[:at]), _domain_text(spec[at + 1 :])
    else:
        local, domain = _local_text(spec), ""
    return Address(name, route, local, domain)


def parse_address_list(text: str) -> list[Address]:
    """The addresses of a header field value (unfolded), groups included."""
    toks = _tokens(text)
    out: list[Address] = []
    i, n = 0, len(toks)
    in_group = False
    while i < n:
        kind = toks[i][0]
        if kind == ",":
            i += 1
            continue
        if kind == ";":
            if in_group:
                out.append(_GROUP_END)
                in_group = False
            i += 1
            continue
        phrase: list[Token] = []
        angle: list[Token] | None = None
        after: list[Token] = []
        while i < n and toks[i][0] not in (",", ";", "<", ":"):
            phrase.append(toks[i])
            i += 1
        if i < n and toks[i][0] == ":" and not in_group and not any(k == "@" for k, _ in phrase):
            out.append(Address(None, None, _word_text(phrase), None))
            in_group = True
            i += 1
            continue
        if i < n and toks[i][0] == "<":
            i += 1
            angle = []
            while i < n and toks[i][0] != ">":
                angle.append(toks[i])
                i += 1
            i += 1  # skip '>'
            while i < n and toks[i][0] not in (",", ";"):  # comments (or junk) after '>'
                after.append(toks[i])
                i += 1
        elif i < n and toks[i][0] == ":":  # stray colon inside an address
            phrase.append(("a", ":"))
            i += 1
            while i < n and toks[i][0] not in (",", ";", "<"):
                phrase.append(toks[i])
                i += 1
        if angle is None and not any(k in ("a", "q") for k, _ in phrase):
            continue
        out.append(_mailbox(phrase, angle, after))
    if in_group:
        out.append(_GROUP_END)
    return out


def address_text(text: str) -> str:
    """The addresses of a field value written out plainly, ``Name <local@domain>, ...``
    (groups as ``group: ...;``): comments, folding and quoting noise gone, so SEARCH FROM
    finds ``user-from@domain.org`` in ``<user-from (comment)@ (comment) domain.org>``."""
    parts: list[str] = []
    for a in parse_address_list(text):
        if a.is_group_end:
            parts.append(";")
            continue
        if a.is_group_start:
            parts.append(f"{a.mailbox}:")
            continue
        spec = f"{a.mailbox}@{a.host}" if a.host else (a.mailbox or "")
        parts.append(f"{a.name} <{spec}>" if a.name else spec)
    return ", ".join(parts)


# -- the common case without the tokenizer -----------------------------------------------------

_ATEXT = rb"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"  # RFC 5322 3.2.3 atext (ASCII only)
_DOT_ATOM = rb"%s+(?:\.%s+)*" % (_ATEXT, _ATEXT)
#: one list element in its plainest forms: ``local@domain``, ``Some Name <local@domain>``,
#: ``"Name, with specials" <local@domain>`` (no comments, no quoted pairs, no groups, no
#: 8-bit), then a comma or the end
_SIMPLE_ELEMENT = re.compile(
    rb"(?:(?P<l1>%(d)s)@(?P<d1>%(d)s)"
    rb"|(?:(?P<phrase>%(a)s+(?:[ \t]+%(a)s+)*)"
    rb'|"(?P<q>[\t\x20\x21\x23-\x5b\x5d-\x7e]*)")?'
    rb"[ \t]*<(?P<l2>%(d)s)@(?P<d2>%(d)s)>)"
    rb"[ \t]*(?:,|\Z)" % {b"d": _DOT_ATOM, b"a": _ATEXT}
)
_SEPARATORS = re.compile(rb"[ \t,]*")
_PHRASE_SPACE = re.compile(rb"[ \t]+")


def simple_address_list(value: bytes) -> list[tuple[bytes | None, bytes, bytes]] | None:
    """``[(name, mailbox, host)]`` for a field value made only of plain addresses (see
    ``_SIMPLE_ELEMENT``), or None when anything else is in it and the full parser must run.

    Mail is overwhelmingly written this way, and the tokenizer costs ~10x more per address;
    the answer is what :func:`parse_address_list` gives for the same value (a unit test
    compares the two on generated values)."""
    out: list[tuple[bytes | None, bytes, bytes]] = []
    pos, n = 0, len(value)
    skip, match = _SEPARATORS.match, _SIMPLE_ELEMENT.match
    while True:
        pos = skip(value, pos).end()  # type: ignore[union-attr]  # "*" always matches
        if pos >= n:
            return out
        m = match(value, pos)
        if m is None:
            return None
        pos = m.end()
        local = m.group("l1")
        if local is not None:
            out.append((None, local, m.group("d1")))
            continue
        phrase, quoted = m.group("phrase"), m.group("q")
        name = _PHRASE_SPACE.sub(b" ", phrase) if phrase is not None else quoted
        out.append((name or None, m.group("l2"), m.group("d2")))
