"""What tests dig out of a message: its plain text, a snippet, links and one-time codes.

* :func:`html_text`: the visible text of an HTML part (no script, style or head), entities
  decoded, for the snippet, the free-text search and the code finder.
* :func:`links`: http(s) URLs in the order they appear: ``href`` of ``<a>`` and ``<area>``
  in the HTML part, then bare URLs in the text part; each once.  Images are left out (a
  tracking pixel is not a link a test wants).
* :func:`codes`: one-time codes, 4 to 8 digits (also written ``123 456`` or ``123-456``):
  for each word such as code, PIN, OTP, verification, passcode, token or sign in, the nearest
  such number after it within 60 characters (or just before it), in the text (or the HTML's
  text when there is no text part).  Dates, times, prices, phone numbers, years and numbers
  inside URLs are not codes.
"""

from __future__ import annotations

import html
import re
from html.parser import HTMLParser

#: Mailpit's snippet length.
SNIPPET_LENGTH = 250
#: Text looked at for links and codes (a huge message is not scanned to its end).
MAX_SCAN = 1024 * 1024

_SKIP = frozenset({"script", "style", "head", "title", "template", "noscript"})
_BLOCK = frozenset(
    {
        "p",
        "div",
        "br",
        "tr",
        "li",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "table",
        "td",
        "th",
        "ul",
        "ol",
        "blockquote",
        "pre",
        "hr",
        "section",
        "article",
        "header",
        "footer",
    }
)


class _TextAndLinks(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.links: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIP:
            self._skip += 1
        elif tag in _BLOCK:
            self.out.append("\n")
        if tag in ("a", "area"):
            for name, value in attrs:
                if name == "href" and value:
                    self.links.append(value.strip())

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in _SKIP:
            self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP:
            self._skip = max(0, self._skip - 1)
        elif tag in _BLOCK:
            self.out.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.out.append(data)


def _parse_html(markup: str) -> _TextAndLinks:
    parser = _TextAndLinks()
    try:
        parser.feed(markup[:MAX_SCAN])
        parser.close()
    except Exception:
        pass
    return parser


def html_text(markup: str) -> str:
    """The visible text of an HTML document, one line per block."""
    text = "".join(_parse_html(markup).out)
    lines = (" ".join(line.split()) for line in text.split("\n"))
    return "\n".join(line for line in lines if line)


def snippet(text: str, markup: str) -> str:
    """Up to 250 characters of the message text (the HTML's text when there is no text
    part), white space collapsed, as Mailpit's ``Snippet``."""
    source = text if text.strip() else html_text(markup)
    flat = " ".join(source[: SNIPPET_LENGTH * 8].split())
    if len(flat) <= SNIPPET_LENGTH:
        return flat
    return flat[:SNIPPET_LENGTH].rstrip() + "..."


_URL = re.compile(r"""https?://[^\s<>"'`{}|\\^\[\]]+""", re.IGNORECASE)
_TRAILING = ".,;:!?'\""


def _clean_url(url: str) -> str | None:
    url = url.strip()
    while url and url[-1] in _TRAILING:
        url = url[:-1]
    while url.endswith(")") and url.count(")") > url.count("("):
        url = url[:-1]
    if not re.match(r"https?://[^/\s]", url, re.IGNORECASE):
        return None
    return url


def links(text: str, markup: str) -> list[str]:
    """Every http(s) link of the message, in order of appearance, each once."""
    found: list[str] = []
    for href in _parse_html(markup).links if markup else []:
        url = _clean_url(html.unescape(href))
        if url:
            found.append(url)
    for m in _URL.finditer(text[:MAX_SCAN]):
        url = _clean_url(m.group())
        if url:
            found.append(url)
    return list(dict.fromkeys(found))


_KEYWORDS = re.compile(
    r"\b(?:codes?|pin|otp|one[- ]time|passcode|pass code|verification|verify|token|2fa|mfa|"
    r"security code|authentication|sign[- ]in|log[- ]?in|c[oó]digo|bestätigungscode|"
    r"sicherheitscode)\b",
    re.IGNORECASE,
)
# 4-8 digits, or two or three groups of 3-4 digits joined by one space or hyphen, standing
# alone: not part of a longer number, a decimal, a date, a time, an amount or a phone number.
_CODE = re.compile(
    r"(?=\d)(?<![\w.,:/\-+$€£#])(?<!\d[ -])"
    r"(\d{4,8}|\d{3,4}[ -]\d{3,4}(?:[ -]\d{3,4})?)(?![\w%]|[.,:/\-]\d)"
)
_DIGITS = re.compile(r"\d\d\d")
#: Characters between a code word and the code after it (half as many for one before it).
NEAR = 60


def codes(text: str, markup: str) -> list[str]:
    """One-time codes: for each code word, the nearest candidate after it (or, if none, just
    before it: "482913 is your code"); digits only (``123 456`` -> ``123456``), each once."""
    source = text if text.strip() else html_text(markup)
    if not _DIGITS.search(source, 0, MAX_SCAN):
        return []  # most messages: no number that could be a code, no need to look further
    source = _URL.sub(" ", source[:MAX_SCAN])
    candidates: list[tuple[int, int, str]] = []
    for m in _CODE.finditer(source):
        digits = re.sub(r"\D", "", m.group(1))
        if 4 <= len(digits) <= 8:
            candidates.append((m.start(), m.end(), digits))
    found: dict[int, str] = {}
    for k in _KEYWORDS.finditer(source):
        after = [c for c in candidates if 0 <= c[0] - k.end() <= NEAR]
        before = [c for c in candidates if 0 <= k.start() - c[1] <= NEAR // 2]
        chosen = after[0] if after else (before[-1] if before else None)
        if chosen is None:
            continue
        start, _, digits = chosen
        year = len(digits) == 4 and 1900 <= int(digits) <= 2099
        if year and not (after and start - k.end() <= 20):
            continue  # a year ("(c) 2024 ...") unless right after the code word
        found[start] = digits
    return list(dict.fromkeys(found[pos] for pos in sorted(found)))
