"""Sandbox mode: a capture server for testing the mail applications send (Mailpit's job).

SMTP takes any sender, recipient and password and keeps each message once, in the inbox of
its AUTH user (``default`` without AUTH); nothing leaves unless released.  Inboxes are Maildir
folders, so IMAP and POP3 read them; a Mailpit-compatible JSON API, a wait endpoint, events
and a web page are mounted on ``[listen] web``.
"""
