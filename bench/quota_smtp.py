"""SMTP acceptance with quota accounting on, as a ratio to off, in one run (issue 13).

One mailsuite server (``bench/mailsuite_target.py``, this working tree) with two users:
``bench@example.test`` without a limit (no ``maildirsize`` file: nothing is counted or checked,
the cost is one failed ``open`` per stored file) and ``quota@example.test`` with a limit far above
what the run stores (``mailsuite user quota quota@example.test 100G``), so every message pays the
whole accounting and never hits the limit: the RCPT check (a ``stat`` of the quota file, and a
read since every delivery changed it), the end-of-data check in the delivery (a read), the
counter update in the write path (an ``O_APPEND`` line under a shared ``flock``) and the
compaction of the file every ~150 messages.  Load and timing are ``bench/sieve_smtp.py``'s (the
same harness): each round sends N messages to each user in turn, the order alternating between
rounds, S concurrent sessions, a new connection per message, timed until every file is in the
Maildir.  Prints msgs/s per round, the medians and their ratio.

    python bench/quota_smtp.py [--rounds 5] [--msgs 1000] [--sessions 20] [--size 4096]

Everything listens on 127.0.0.1; the server is stopped by its PID at the end, failure
included; its directory is a temporary one (``--keep`` keeps it).  Between rounds the Maildir is
emptied behind the server's back, so the quota user's count only grows (a drift ``mailsuite
reindex`` would recount; with a 100G limit it never matters here).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from sieve_smtp import DOMAIN, admin, alternate, arguments, start_server, stop_server  # noqa: E402  (one harness for both benchmarks)


def accounting_cost(n: int = 5000) -> float:
    """Microseconds of quota work one message costs a user with a limit, in process: the
    RCPT check (:class:`UsageCache`), the delivery's check and the counter update (with its
    compactions) -- no server, no network, no fsync: the figure the ratio above hides in the
    noise of a shared machine."""
    from mailsuite.store import quota
    from mailsuite.store.maildir import ensure_folder

    with tempfile.TemporaryDirectory(prefix="mailsuite-quota-cost.") as tmp:
        root = ensure_folder(Path(tmp) / "user")
        quota.recount(root, 100 * 1024**3)
        cache = quota.UsageCache()
        t0 = time.perf_counter()
        for _ in range(n):
            cache.over([root])
            quota.would_exceed(root, 4096)
            quota.charge(root, 4096, 1)
        return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    a = arguments(__doc__)
    work = Path(tempfile.mkdtemp(prefix="mailsuite-quota-smtp."))
    try:
        port, cli, env = start_server(work)
        quota_user = f"quota@{DOMAIN}"
        admin(cli, "user", "add", quota_user, "--password-stdin", stdin="benchpass\n")
        admin(cli, "user", "quota", quota_user, "100G")
        mail = work / "data" / "mail" / DOMAIN
        targets = {
            "quota off": (f"bench@{DOMAIN}", mail / "bench"),
            "quota on": (quota_user, mail / "quota"),
        }
        if (mail / "bench" / "maildirsize").exists() or not (
            mail / "quota" / "maildirsize"
        ).exists():
            raise SystemExit("the users' quota files are not as the benchmark needs")
        rates, _cpus = alternate(port, targets, a, env["MS_PID"])
        off_rate = statistics.median(rates["quota off"])
        on_rate = statistics.median(rates["quota on"])
        counted = (mail / "quota" / "maildirsize").read_text().splitlines()
        messages = sum(int(line.split()[1]) for line in counted[1:] if len(line.split()) == 2)
        if messages < a.rounds * a.msgs:
            raise SystemExit(
                f"the quota file counted {messages} messages, not "
                f"{a.rounds * a.msgs}: is the server running this tree? "
                "(run with PYTHONPATH=. from a worktree)"
            )
        print(
            f"\n{a.msgs} x {a.size} B, {a.sessions} sessions, {a.rounds} rounds "
            f"(median msgs/s): quota off {off_rate:.1f}, quota on {on_rate:.1f}, "
            f"ratio {on_rate / off_rate:.2f}x  (quota file: {len(counted)} lines, "
            f"{messages} messages counted)"
        )
        cost = accounting_cost()
        print(
            f"in process: {cost:.0f} us of quota work per message "
            f"({cost / 1e6 * on_rate * 100:.1f}% of one core at {on_rate:.0f} msgs/s)"
        )
    finally:
        stop_server(work, a.keep)


if __name__ == "__main__":
    main()
