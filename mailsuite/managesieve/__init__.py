"""ManageSieve (RFC 5804): scripts managed by mail clients; session core and Twisted adapter."""
