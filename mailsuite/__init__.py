"""mailsuite: a self-hosted mail server on Twisted."""
