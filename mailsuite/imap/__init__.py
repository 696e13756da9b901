"""IMAP4rev1 server over the shared store."""
