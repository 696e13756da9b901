"""twistd plugin: ``twistd -n mailsuite [--config FILE]``.

Kept tiny because twistd imports every plugin module on every run; the real work lives in
:mod:`mailsuite.tap`.  There is deliberately no ``__init__.py`` in ``twisted/`` or
``twisted/plugins/`` so that Twisted's own package is not shadowed.
"""

from twisted.application.service import ServiceMaker

mailsuite = ServiceMaker(
    "mailsuite",
    "mailsuite.tap",
    "Self-hosted mail server: ESMTP, submission, IMAP4 and POP3 over Maildir",
    "mailsuite",
)
