"""Test support: a loopback DNS server (``dns``) and a scriptable recording SMTP server (``mx``)."""
