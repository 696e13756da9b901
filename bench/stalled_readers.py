"""What clients that never read cost the server: N connections each send ``FETCH 1:*
BODY[]`` over 100 messages of 1 MiB and read nothing; the server's RSS before, while they
wait, and after they were reset, over three rounds (the rounds must not add up).

The regression test (tests/regress/test_stalled_readers.py) does this with 20 clients; this
runs as many as you like (the per-user connection limit is lifted for it).

    python bench/stalled_readers.py [N]      (default 500; raise ``ulimit -n`` for more)
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mailsuite.store.maildir import ensure_folder
from mailsuite.store.write import write_message
from tests.harness import Server
from tests.regress import test_stalled_readers as stalled

EXTRA = (
    "[auth]\nallow_plaintext = true\n"
    "[imap]\nmax_userip_connections = 0\nmax_connections = 0\nmax_connections_per_ip = 0\n"
)


def main(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(Path(tmp), services=("imap",), extra_toml=EXTRA)
        server.start()
        try:
            server.add_user(stalled.USER)
            box = ensure_folder(server.maildir(stalled.USER))
            for i in range(100):
                write_message(box, [stalled._message(i, 1024 * 1024)])
            assert server.proc is not None
            pid = server.proc.pid
            base = stalled._settled_rss(pid)
            for round_no in (1, 2, 3):
                start = time.monotonic()
                socks = [stalled._stalled_imap(server.port("imap")) for _ in range(n)]
                opened = time.monotonic() - start
                waiting = stalled._settled_rss(pid)
                for s in socks:
                    stalled._abort(s)
                after = stalled._settled_rss(pid)
                mib = stalled._mib
                print(
                    f"round {round_no}: {n} stalled FETCH 1:* BODY[] readers: RSS {mib(base)}"
                    f" -> {mib(waiting)} (+{mib(waiting - base)},"
                    f" {(waiting - base) / n / 1024:.0f} KiB each); after they were reset"
                    f" {mib(after)} (+{mib(after - base)}); opened in {opened:.0f} s",
                    flush=True,
                )
        finally:
            server.stop()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 500)
