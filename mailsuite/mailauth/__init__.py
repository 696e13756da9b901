"""Mail authentication: DKIM signing of outgoing mail; SPF, DKIM, DMARC and ARC checks of
incoming mail, reported in one Authentication-Results header; the DNS records a domain needs."""
