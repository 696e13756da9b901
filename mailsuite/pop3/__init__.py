"""POP3 server over the shared store."""
