"""State the processes of one server share (``[server] workers`` > 1), each piece behind a
small interface with a single-process implementation and a cross-process one: login
throttling (:mod:`mailsuite.shared.counters`), connection counts
(:mod:`mailsuite.shared.connection_table`), folder change
notifications (:mod:`mailsuite.shared.folder_watch`); docs/scale-out.md lists them all and
what a several-machine implementation puts behind each."""
