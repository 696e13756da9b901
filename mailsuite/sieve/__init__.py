"""Sieve (RFC 5228) at local delivery: parser, validator, interpreter, vacation, script storage."""
