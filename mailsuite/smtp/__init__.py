"""Our own ESMTP server and SMTP client (twisted.mail.smtp is unsafe: see README)."""
