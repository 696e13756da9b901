#!/usr/bin/env bash
# bench/workers_smtp.sh: SMTP 4 KiB acceptance with [server] workers = 1 and = 2, in one run.
#
#   bench/workers_smtp.sh              # 3 interleaved rounds, 2000 x 4 KiB each
#   TRIALS=5 SMTP_MSGS=5000 bench/workers_smtp.sh
#
# Starts two mailsuite servers from this working tree (bench/mailsuite_target.py, one with
# --workers 1, one with --workers 2, each in its own temporary directory on free ports), then
# for each round runs the shared run_target.sh --steps smtp (smtp-source, SMTP_SESSIONS
# sessions, a new connection per message, timed until the files are in the Maildir) against
# each in rotating order, and prints msgs/s per round and the ratio of the medians
# (workers=2 / workers=1).  Both servers are stopped by PID at the end, failure included.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SHARED_BENCH=${SHARED_BENCH:-$(cd "$HERE/../../shared/bench" 2>/dev/null && pwd)}
# shellcheck source=/dev/null
source "$SHARED_BENCH/env.sh"
PY=${MAILSUITE_PYTHON:-$(command -v python3)}
TRIALS=${TRIALS:-3}
SMTP_MSGS=${SMTP_MSGS:-2000}
WORK=$(mktemp -d "${TMPDIR_BASE:-/var/tmp}/mailsuite-workers-bench.XXXXXX")
chmod 755 "$WORK"
export RESULTS=$WORK/results
mkdir -p "$RESULTS"

STARTED=""
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    for n in $STARTED; do "$PY" "$HERE/mailsuite_target.py" stop --dir "$WORK/$n" || true; done
    if [ "${KEEP:-0}" = 1 ]; then echo "kept $WORK"; else rm -rf "${WORK:?}"; fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

declare -A ARGS
for w in 1 2; do
    n=w$w
    env_out=$("$PY" "$HERE/mailsuite_target.py" start --dir "$WORK/$n" --workers "$w" \
        --password "$BENCH_PASS" --domain "$BENCH_DOMAIN") || { echo "could not start $n"; exit 1; }
    STARTED="$STARTED $n"
    eval "$env_out"
    ARGS[$n]="--pid $MS_PID --smtp-port $MS_SMTP_PORT --maildir-fmt $MS_MAILDIR_FMT"
done
sleep 3  # the workers of w2 import and adopt the sockets

declare -A RATES
for ((r = 0; r < TRIALS; r++)); do
    echo "round $((r + 1))/$TRIALS (load: $(cut -d' ' -f1-3 /proc/loadavg))"
    for n in $( ((r % 2)) && echo "w2 w1" || echo "w1 w2"); do
        # shellcheck disable=SC2086
        env TRIALS=1 SMTP_APPEND=1 SMTP_MSGS="$SMTP_MSGS" \
            "$SHARED_BENCH/run_target.sh" --name "$n" ${ARGS[$n]} --steps smtp >"$WORK/step.log" 2>&1
        rate=$(sed -n "s/.*'deliver_msgs_per_s': \([0-9.]*\).*/\1/p" "$WORK/step.log" | tail -1)
        echo "  workers=${n#w}: ${rate:-FAILED} msgs/s"
        [ -n "$rate" ] && RATES[$n]="${RATES[$n]:-} $rate"
    done
done
"$PY" - "${RATES[w1]:-}" "${RATES[w2]:-}" <<'PYEOF'
import statistics, sys
one, two = ([float(x) for x in a.split()] for a in sys.argv[1:3])
if one and two:
    m1, m2 = statistics.median(one), statistics.median(two)
    print(f"median workers=1 {m1:.0f} msgs/s, workers=2 {m2:.0f} msgs/s: ratio {m2 / m1:.2f}x")
PYEOF
