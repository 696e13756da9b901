"""The HTTP listener (``[listen] web``): a small twisted.web resource tree that other parts mount
into (health, metrics and mail client autoconfiguration now; the sandbox UI and API later)."""
