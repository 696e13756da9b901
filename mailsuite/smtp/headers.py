"""Edits of a stored header section that the end-of-data checks ask for: fields added at the
top (Authentication-Results, DKIM-Signature) and fields taken out (forged
Authentication-Results, RFC 8601 5).  Pure functions on the stored form (LF line ends)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HeaderEdit:
    """Replace the first ``old_length`` bytes of the stored message (after our trace fields:
    the top of its header section) with ``new`` (LF line ends)."""

    old_length: int
    new: bytes


def header_field(text: str) -> bytes:
    """A header field a check asked to add, as stored (LF line ends), after making sure it is
    one field: ``Name: value``, continuation lines starting with white space, no CR or NUL
    (RFC 5322 2.2), so a check's bug cannot inject fields or end the header section."""
    lines = text.split("\n")
    name, colon, _ = lines[0].partition(":")
    # RFC 5322 2.2 ftext, 33-126 (no colon: split at the first): printable ASCII but space,
    # asked of the whole name at once (a test per character: 45 Python calls per message
    # for an Authentication-Results field, bench/smtp_calls.py)
    valid = (
        bool(colon and name and name.isascii() and name.isprintable() and " " not in name)
        and "\r" not in text
        and "\x00" not in text
    )
    for line in lines[1:] if valid else ():
        if line[:1] not in (" ", "\t") or not line.strip():
            valid = False
            break
    if not valid:
        raise ValueError(f"a check asked to add an invalid header field: {text[:80]!r}")
    return text.encode("utf-8") + b"\n"


def split_fields(headers: bytes) -> list[bytes]:
    """A header section (LF line ends) as its fields, folded lines kept, without line ends;
    ``b"\\n".join()`` gives the section back byte for byte."""
    fields: list[bytes] = []
    for line in headers.split(b"\n"):
        if fields and line[:1] in (b" ", b"\t"):
            fields[-1] += b"\n" + line
        else:
            fields.append(line)
    return fields


def header_edit(
    headers: bytes, complete: bool, prepend: tuple[str, ...], remove: tuple[bytes, ...]
) -> HeaderEdit | None:
    """The edit for an end-of-data verdict's ``prepend`` and ``remove`` (see
    :class:`mailsuite.smtp.policy.Verdict`) on the stored header section ``headers``
    (``complete``: its end, the blank line, was seen).  None when nothing changes."""
    if not prepend and not remove:
        return None
    added = b"".join(header_field(text) for text in prepend)
    unwanted = {f.rstrip(b"\n") for f in remove}
    fields = split_fields(headers) if unwanted else []
    kept = [f for f in fields if f not in unwanted]
    if len(kept) == len(fields):
        return HeaderEdit(0, added) if added else None
    old_length = len(headers)
    if not kept and complete:
        old_length += 1  # the last field's line end goes too: one blank line stays
    return HeaderEdit(old_length, added + b"\n".join(kept))
