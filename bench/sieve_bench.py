"""What a 50-rule Sieve script costs one local delivery, in process.

Times ``sieve.engine.evaluate`` (active-script lookup, cached compile, header read, run,
outcome) per message for: no active script (one lstat: the baseline every delivery pays),
a typical 50-rule script (header/address/envelope/exists tests, fileinto, flags; none
matches, so every rule is considered) reading the message file, and the same with the
message in memory, as SMTP delivery of a message under 256 KiB calls it.  The end-to-end
figure of issue 16 (SMTP acceptance with vs without a script) is bench/sieve_smtp.py.

    python bench/sieve_bench.py [N]      (default 2000)
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

from mailsuite.sieve.engine import SieveSettings, evaluate
from mailsuite.sieve.interpreter import SieveEnvelope
from mailsuite.sieve.storage import ScriptStore
from mailsuite.store.maildir import ensure_folder

RULES = ['require ["fileinto", "envelope", "subaddress", "imap4flags", "variables", "body"];']
for i in range(50):
    kind = i % 5
    if kind == 0:
        RULES.append(
            f'if header :contains "subject" "[list-{i}]" {{ fileinto "Lists.l{i}"; stop; }}'
        )
    elif kind == 1:
        RULES.append(f'if address :domain :is "from" "sender{i}.example" {{ fileinto "F{i}"; }}')
    elif kind == 2:
        RULES.append(f'if envelope :detail "to" "tag{i}" {{ addflag "$Tag{i}"; }}')
    elif kind == 3:
        RULES.append(f'if header :matches "x-mailer" "*bot{i}*" {{ fileinto "Bots"; }}')
    else:
        RULES.append(f'if exists "x-flag-{i}" {{ addflag "\\\\Flagged"; }}')
SCRIPT = "\n".join(RULES) + "\n"

MESSAGE = (
    b"Return-Path: <someone@example.org>\nDelivered-To: alice@example.test\n"
    b"Received: from mx.example.org by mx.example.test; Tue, 1 Oct 2024 10:00:00 +0000\n"
    b"From: Someone <someone@example.org>\nTo: alice@example.test\n"
    b"Subject: quarterly numbers\nMessage-ID: <x@example.org>\nX-Mailer: Thunderbird\n"
    b"Date: Tue, 1 Oct 2024 10:00:00 +0000\n\n" + b"Body line of text.\n" * 200
)


def timed(root: Path, msg: Path, n: int, in_memory: bool = False) -> list[float]:
    env = SieveEnvelope("someone@example.org", "alice@example.test", "alice@example.test")
    settings = SieveSettings()
    data = MESSAGE
    contents = (lambda: data) if in_memory else None
    out = []
    for _ in range(n):
        t = time.perf_counter()
        evaluate(root, msg, env, settings, contents=contents)
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    with tempfile.TemporaryDirectory() as d:
        root = ensure_folder(Path(d) / "alice")
        msg = Path(d) / "msg"
        msg.write_bytes(MESSAGE)
        none = timed(root, msg, n)
        store = ScriptStore(root)
        store.put("rules", SCRIPT)
        store.activate("rules")
        rules = timed(root, msg, n)
        memory = timed(root, msg, n, in_memory=True)
    for name, times in (
        ("no script", none),
        ("50 rules", rules),
        ("50 rules, message in memory", memory),
    ):
        print(
            f"{name:28} median {statistics.median(times) * 1e6:8.1f} us   "
            f"p95 {sorted(times)[int(len(times) * 0.95)] * 1e6:8.1f} us"
        )


if __name__ == "__main__":
    main()
