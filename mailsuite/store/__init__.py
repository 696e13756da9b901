"""Maildir++ store with a per-folder UID/flags index shared by delivery, IMAP and POP3."""
