"""Durable outbound queue: spool entries, schedule, bounces."""
