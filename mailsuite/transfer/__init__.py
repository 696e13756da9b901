"""Moving mail in and out: ``mailsuite import`` (mbox, Maildir, Maildir++ with Dovecot
keywords), ``mailsuite export`` (a Maildir++ tree) and ``mailsuite reindex``, with progress."""
