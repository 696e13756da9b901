"""Outbound relay: MX resolution and SMTP delivery to remote hosts."""
