"""Parsed header fields of an open folder's messages, kept between SEARCH commands.

A SEARCH on a header key (SUBJECT, FROM, HEADER ...) needs every candidate message's header
fields, decoded and case-folded: without a cache each such SEARCH opens and parses every file
of the folder again (in the IMAP stress benchmark of issue 15, 34 ms of CPU per SEARCH in a
1,000-message folder against Dovecot's 1.5 ms, which keeps the header fields it was asked for
in ``dovecot.index.cache``).  A message's content never changes under its UID (RFC 3501
2.3.1.1: a new UIDVALIDITY comes with a new :class:`~mailsuite.store.mailbox.Folder`), so
what was parsed once stays right for as long as the folder object lives; expunged UIDs simply
age out.

One cache per open folder (``for_folder``, held weakly: it goes with the folder), bounded by
an estimate of its size (``budget`` bytes, least recently used first out), so a search of a
100,000-message folder cycles through the cache instead of growing the process.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict

#: the estimate of what one cached message costs besides its header text (dicts, lists, str)
_OVERHEAD = 600
#: default budget per open folder: ~4,000 messages with 2 KiB headers
BUDGET = 16 * 1024 * 1024


class Entry:
    """One message's fields: ``raw`` by lower-cased name (values as written), ``folded``
    (decoded and case-folded, filled in when a search first needs it)."""

    __slots__ = ("folded", "raw", "size")

    def __init__(self, raw: dict[str, list[bytes]], size: int) -> None:
        self.raw = raw
        self.folded: dict[str, list[str]] | None = None
        self.size = size


class HeaderCache:
    """uid -> :class:`Entry`, least recently used out past ``budget`` estimated bytes."""

    def __init__(self, budget: int = BUDGET) -> None:
        self.budget = budget
        self.used = 0
        self._entries: OrderedDict[int, Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, uid: int) -> Entry | None:
        entry = self._entries.get(uid)
        if entry is not None:
            self._entries.move_to_end(uid)
        return entry

    def put(self, uid: int, raw: dict[str, list[bytes]], header_size: int) -> Entry:
        old = self._entries.pop(uid, None)
        if old is not None:
            self.used -= old.size
        # the folded copy is about as big as the text again
        entry = Entry(raw, 2 * header_size + _OVERHEAD)
        self._entries[uid] = entry
        self.used += entry.size
        while self.used > self.budget and len(self._entries) > 1:
            _, gone = self._entries.popitem(last=False)
            self.used -= gone.size
        return entry


_caches: weakref.WeakKeyDictionary[object, HeaderCache] = weakref.WeakKeyDictionary()


def for_folder(folder: object) -> HeaderCache:
    """The cache of an open folder (made on first use, dropped with the folder)."""
    cache = _caches.get(folder)
    if cache is None:
        cache = _caches[folder] = HeaderCache()
    return cache
