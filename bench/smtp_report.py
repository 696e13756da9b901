"""Print the SMTP acceptance table of one bench/smtp.sh run: msgs/s (in the Maildir) of each
target and mailsuite's ratios to Postfix and aiosmtpd, from the same run.

    python bench/smtp_report.py --results DIR [--md OUT.md]

Reads the ``smtp-small-NAME.json`` / ``smtp-large-NAME.json`` files that the shared
harness's ``smtp_bench.py`` writes.  Figures are the median over trials (min-max beside it);
a ratio is the ratio of the medians.  Every mailsuite variant of the run (``mailsuite``,
``mailsuite-wN``, ``compare-wN``, each also with ``-noauth``: mail authentication off; see
bench/smtp.sh) gets its columns; ``--load`` adds the
range of the 1-minute load average sampled during the run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PEERS = ("postfix", "aiosmtpd")


def load(results: Path, kind: str) -> dict[str, dict]:
    out = {}
    for path in sorted(results.glob(f"smtp-{kind}-*.json")):
        out[path.stem[len(f"smtp-{kind}-") :]] = json.loads(path.read_text())
    return out


def variants(results: Path) -> list[str]:
    """The mailsuite targets of the run, ``mailsuite`` first."""
    names = {n for kind in ("small", "large") for n in load(results, kind) if n not in PEERS}
    return sorted(names, key=lambda n: (n != "mailsuite", n))


def cell(run: dict | None, key: str = "msgs_per_s") -> str:
    if not run or not run.get(key) or run[key].get("median") is None:
        return "-"
    s = run[key]
    if s["n"] == 1:
        return f"{s['median']:.1f}"
    return f"{s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f})"


def med(run: dict | None) -> float | None:
    if not run:
        return None
    return run.get("msgs_per_s", {}).get("median")


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--results", required=True)
    ap.add_argument("--md")
    ap.add_argument("--load", help="loadavg samples of the run (bench/smtp.sh's loadavg.txt)")
    a = ap.parse_args()
    results = Path(a.results)
    env = {}
    if (results / "env.json").exists():
        env = json.loads((results / "env.json").read_text())
    lines = []
    if env:
        lines.append(
            f"Run {env.get('date')} on {env.get('cores')} cores ({env.get('cpu')}), "
            f"{env.get('fs')}; Postfix {env.get('postfix')}, Python {env.get('python')}, "
            f"mode {env.get('mode')}, trials {env.get('trials')}, "
            f"{env.get('sessions')} sessions, new connection per message, "
            f"counted until the files are in the Maildir."
        )
        lines.append("")
    ours = variants(results)
    kinds = [load(results, k) for k in ("small", "large")]
    peers = [p for p in PEERS if any(p in runs for runs in kinds)]  # the peers of this run
    head = ["size", "msgs", *(f"{p} msgs/s" for p in peers)]
    for n in ours:
        head += [f"{n} msgs/s", f"{n} accepted msgs/s", *(f"{n}/{p}" for p in peers)]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    failed = []
    for kind, label in (("small", "4 KiB"), ("large", "1 MiB")):
        runs = load(results, kind)
        if not runs:
            continue
        any_run = next(iter(runs.values()))
        for name, r in runs.items():
            if r.get("failed_trials"):
                failed.append(f"{name} {label}: {r['failed_trials']} failed trial(s)")
        row = [label, str(any_run.get("msgs")), *(cell(runs.get(p)) for p in peers)]
        for n in ours:
            ms = runs.get(n)
            row += [cell(ms), cell(ms, "accept_msgs_per_s")]
            row += [ratio(med(ms), med(runs.get(p))) for p in peers]
        lines.append("| " + " | ".join(row) + " |")
    if a.load and Path(a.load).exists():
        loads = [
            float(line.split()[0])
            for line in Path(a.load).read_text().splitlines()
            if line[:1].isdigit() and "." in line.split()[0]
        ]
        if loads:
            lines.append("")
            lines.append(f"Load average (1 min) during the run: {min(loads):.2f}-{max(loads):.2f}")
    if failed:
        lines.append("")
        lines.append("FAILED: " + "; ".join(failed))
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if a.md:
        Path(a.md).resolve().parent.mkdir(parents=True, exist_ok=True)
        Path(a.md).write_text(text)


if __name__ == "__main__":
    main()
