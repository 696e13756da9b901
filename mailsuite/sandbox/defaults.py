"""The embedded sandbox configuration: what ``twistd -n mailsuite --sandbox`` runs.

Mailpit's ports for SMTP (1025) and the web page and API (8025), so test setups written for
Mailpit switch over by changing nothing; IMAP on 1143 and POP3 on 1110.  Everything on
127.0.0.1, data in ``./mailsuite-sandbox``.  ``etc/mailsuite-sandbox.toml`` is the same file
with comments (a unit test keeps the two equal).
"""

SANDBOX_TOML = """
[server]
mode = "sandbox"
hostname = "localhost"
data_dir = "mailsuite-sandbox"

[listen]
smtp = ["tcp:1025:interface=127.0.0.1"]
web = ["tcp:8025:interface=127.0.0.1"]
imap = ["tcp:1143:interface=127.0.0.1"]
pop3 = ["tcp:1110:interface=127.0.0.1"]

[sandbox]
max_messages = 5000
release = false
"""
