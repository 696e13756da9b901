"""Import rate of ``mailsuite import``: N small messages (~400 bytes) from an mbox file and from
a Maildir, into a fresh user, run as a person runs it (the ``mailsuite`` command in a child
process, progress to a pipe).  Prints messages/s for each source and the time of a second run
over the same source (everything already there: the resume check alone).

    python bench/import_rate.py [N]        (default 100000; --keep keeps the folder)

Each message is fsynced as an IMAP APPEND is, so the figure is bound by the disk's flush rate
(several writer threads let the file system commit flushes together); compare runs on the same
machine.  Files go under $TMPDIR (default /var/tmp), removed at the end.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PASSWORD = "benchpass"


def make_mbox(path: Path, n: int) -> None:
    with path.open("wb") as f:
        for i in range(n):
            status = b"Status: RO\n" if i % 2 else b""
            f.write(
                b"From sender@example.org Thu Nov 29 10:%02d:%02d 2026\n"
                b"From: Sender <sender@example.org>\nTo: bench@example.test\n"
                b"Subject: message %d\nDate: Thu, 29 Nov 2026 10:00:00 +0000\n"
                b"Message-ID: <%d@example.org>\n%s\n"
                b"This is the body of a small message, a few lines long.\n"
                b"It has enough text to look like mail and not more.\n"
                b">From a quoted line\n\n" % (i // 60 % 60, i % 60, i, i, status)
            )


def make_maildir(root: Path, n: int) -> None:
    for sub in ("cur", "new", "tmp"):
        (root / sub).mkdir(parents=True)
    t = int(time.time()) - n
    for i in range(n):
        name = f"{t + i}.M{i}P1Q{i}.bench:2,{'S' if i % 2 else ''}"
        (root / "cur" / name).write_bytes(
            b"From: Sender <sender@example.org>\nTo: bench@example.test\n"
            b"Subject: message %d\n\nThis is the body of a small message.\n" % i
        )


def run(config: Path, *args: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "mailsuite.cli", "--config", str(config), *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return time.perf_counter() - t0, done.stdout.strip().splitlines()[0]


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    n = int(args[0]) if args else 100_000
    tmp = os.environ.get("TMPDIR", "/var/tmp")
    base = Path(tempfile.mkdtemp(prefix="mailsuite-import-bench.", dir=tmp))
    try:
        config = base / "mailsuite.toml"
        config.write_text(
            '[server]\nhostname = "localhost"\ndata_dir = "data"\n'
            '[domains]\nlocal = ["example.test"]\n'
        )
        for user in ("mbox", "maildir"):
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "mailsuite.cli",
                    "--config",
                    str(config),
                    "user",
                    "add",
                    f"{user}@example.test",
                    "--password-stdin",
                ],
                input=PASSWORD + "\n",
                capture_output=True,
                text=True,
                check=True,
            )
        make_mbox(base / "source.mbox", n)
        make_maildir(base / "source-maildir", n)
        size = (base / "source.mbox").stat().st_size
        print(f"{n:,} messages, mbox {size / 1e6:.1f} MB, {os.cpu_count()} CPUs", flush=True)
        for user, source in (("mbox", "source.mbox"), ("maildir", "source-maildir")):
            seconds, summary = run(config, "import", f"{user}@example.test", str(base / source))
            print(
                f"{user:8} import: {n / seconds:8,.0f} msgs/s  ({seconds:.1f} s; {summary})",
                flush=True,
            )
            seconds, summary = run(config, "import", f"{user}@example.test", str(base / source))
            print(f"{user:8} again:  {seconds:8.1f} s to find everything already there", flush=True)
    finally:
        if "--keep" in sys.argv:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
