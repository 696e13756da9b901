#!/usr/bin/env bash
# bench/smtp.sh: SMTP acceptance benchmark, mailsuite side by side with Postfix and aiosmtpd.
#
#   bench/smtp.sh                 # full run: 5 interleaved trials, 5000 x 4 KiB, 200 x 1 MiB
#   QUICK=1 bench/smtp.sh         # smoke run: 1 trial, 500 x 4 KiB, 20 x 1 MiB
#   TRIALS=3 TARGETS="mailsuite" bench/smtp.sh   # any subset; sizes via SMTP_MSGS etc.
#
# In one run it starts, all on 127.0.0.1 with fresh state in a temporary directory:
#   - Postfix and aiosmtpd, with the shared harness's peers.sh (own RUN dir, own free ports in
#     10000-10999, so a concurrent run_peers.sh of another engineer is not disturbed);
#   - mailsuite (twistd -n mailsuite, this working tree) via bench/mailsuite_target.py.
# Then, for each round, each target in rotating order gets run_target.sh --steps
# 'smtp smtp_large' (smtp-source, SMTP_SESSIONS sessions, new connection per message, timed
# until the files are in the Maildir), and at the end bench/smtp_report.py prints msgs/s and
# the ratios mailsuite/Postfix and mailsuite/aiosmtpd.  Every process it started is stopped
# by PID on exit, failure included.  Results: $OUT (default bench/results/smtp-DATE/).
#
# Needs ../shared/bench/setup-peers.sh to have run once (Postfix, smtp-source, peers venv).
# MAILSUITE_SERVICES=smtp,imap,pop3 also opens IMAP/POP3 on the mailsuite target.
# Several mailsuite variants in the same rounds: a target "mailsuite-wN" is mailsuite with
# [server] workers = N ("mailsuite" has MAILSUITE_WORKERS, default 1), and "compare-wN" runs
# the tree in MAILSUITE_COMPARE_TREE (e.g. the main checkout, through PYTHONPATH) likewise:
#   TARGETS="postfix mailsuite mailsuite-w2" bench/smtp.sh
#   MAILSUITE_COMPARE_TREE=/path/to/main TARGETS="mailsuite-w1 compare-w1" bench/smtp.sh
# Any of them with "-noauth" appended runs with every [mail_auth] check off (Postfix here checks
# nothing; mailsuite checks SPF/DKIM/DMARC/ARC on the MX port by default):
#   TARGETS="postfix mailsuite-w2 mailsuite-w2-noauth" bench/smtp.sh
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SHARED_BENCH=${SHARED_BENCH:-$(cd "$HERE/../../shared/bench" 2>/dev/null && pwd)}
# shellcheck source=/dev/null
source "$SHARED_BENCH/env.sh"
MAILSUITE_PYTHON=${MAILSUITE_PYTHON:-$(command -v python3)}
MAILSUITE_SERVICES=${MAILSUITE_SERVICES:-smtp}
TARGETS=${TARGETS:-"postfix aiosmtpd mailsuite"}

if [ "${QUICK:-0}" = 1 ]; then
    TRIALS=${QUICK_TRIALS:-1} SMTP_MSGS=${QUICK_SMTP_MSGS:-500} SMTP_LARGE_MSGS=${QUICK_LARGE_MSGS:-20}
    MODE=quick
else
    MODE=full
fi
STEPS=${SMTP_STEPS:-"smtp smtp_large"}
STAMP=$(date +%Y%m%d-%H%M%S)
OUT=${OUT:-$HERE/results/smtp-$STAMP}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

# Fresh state for every run; world-traversable because Postfix's virtual(8) delivers as uid
# $BENCH_UID into it.
WORK=$(mktemp -d "${TMPDIR_BASE:-/var/tmp}/mailsuite-smtp-bench.XXXXXX")
chmod 755 "$WORK"
export RUN=$WORK/peers RESULTS=$OUT
mkdir -p "$RUN"

free_port() {  # a free 127.0.0.1 port in [lo, hi)
    "$MAILSUITE_PYTHON" - "$1" "$2" <<'EOF'
import random, socket, sys
lo, hi = int(sys.argv[1]), int(sys.argv[2])
ports = list(range(lo, hi)); random.shuffle(ports)
for p in ports:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", p))
        except OSError:
            continue
        print(p); break
EOF
}
PORT_POSTFIX_SMTP=$(free_port 10500 10750)
PORT_AIOSMTPD_SMTP=$(free_port 10750 11000)
export PORT_POSTFIX_SMTP PORT_AIOSMTPD_SMTP

STARTED_PEERS=""
MS_STARTED=""
SAMPLER=
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    [ -n "$SAMPLER" ] && kill "$SAMPLER" 2>/dev/null
    for n in $MS_STARTED; do
        "$MAILSUITE_PYTHON" "$HERE/mailsuite_target.py" stop --dir "$WORK/$n" || true
        cp "$WORK/$n/twistd.log" "$OUT/$n-twistd.log" 2>/dev/null
    done
    # shellcheck disable=SC2086
    [ -n "$STARTED_PEERS" ] && (cd "$SHARED_BENCH" && ./peers.sh stop $STARTED_PEERS >/dev/null 2>&1)
    sleep 1
    if [ "${KEEP:-0}" = 1 ]; then log "kept $WORK"; else rm -rf "${WORK:?}"; fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

has_target() { [[ " $TARGETS " == *" $1 "* ]]; }

# ---- start the servers
for p in postfix aiosmtpd; do
    has_target "$p" || continue
    STARTED_PEERS="$STARTED_PEERS $p"
    (cd "$SHARED_BENCH" && ./peers.sh start "$p") || { log "could not start $p"; exit 1; }
done
# "-noauth" at the end of a mailsuite target name: the same server with every [mail_auth]
# check off (SPF, DKIM, DMARC, ARC), like Postfix here, which checks nothing.  The default
# checks every message arriving on the MX port; both in one run show what the checks cost.
NOAUTH_TOML=$'[mail_auth]\nspf = false\ndkim = false\ndmarc = false\narc = false'
declare -A ARGS
for n in $TARGETS; do
    base=${n%-noauth} extra=
    [ "$base" != "$n" ] && extra=$NOAUTH_TOML
    case $base in
        # this tree through PYTHONPATH: the installed package may be another checkout's
        mailsuite) workers=${MAILSUITE_WORKERS:-1} tree=$(cd "$HERE/.." && pwd) ;;
        mailsuite-w*) workers=${base#mailsuite-w} tree=$(cd "$HERE/.." && pwd) ;;
        compare-w*) workers=${base#compare-w} tree=${MAILSUITE_COMPARE_TREE:?set MAILSUITE_COMPARE_TREE} ;;
        *) continue ;;
    esac
    MS_STARTED="$MS_STARTED $n"
    MS_ENV=$(env ${tree:+PYTHONPATH=$tree} "$MAILSUITE_PYTHON" "$HERE/mailsuite_target.py" start \
        --dir "$WORK/$n" --workers "$workers" --services "$MAILSUITE_SERVICES" \
        --password "$BENCH_PASS" --domain "$BENCH_DOMAIN" --extra-toml "$extra") \
        || { log "could not start $n"; exit 1; }
    eval "$MS_ENV"
    ARGS[$n]="--pid $MS_PID --smtp-port $MS_SMTP_PORT --maildir-fmt $MS_MAILDIR_FMT"
    log "$n (workers=$workers${tree:+, tree $tree}${extra:+, mail auth checks off}) pid $MS_PID smtp port $MS_SMTP_PORT (data in $MS_DIR)"
done
[ -n "$MS_STARTED" ] && sleep 3  # workers import and adopt the listening sockets

{
    echo "{"
    echo "\"date\": \"$(date -u +%FT%TZ)\","
    echo "\"kernel\": \"$(uname -r)\","
    echo "\"cpu\": \"$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')\","
    echo "\"cores\": $(nproc),"
    echo "\"fs\": \"$(df -T "$WORK" | awk 'NR==2 {print $2}')\","
    echo "\"postfix\": \"$(postconf -d -h mail_version 2>/dev/null)\","
    echo "\"python\": \"$("$MAILSUITE_PYTHON" -c 'import sys; print(sys.version.split()[0])')\","
    echo "\"mailsuite_commit\": \"$(git -C "$HERE/.." rev-parse --short HEAD 2>/dev/null)\","
    echo "\"mode\": \"$MODE\", \"trials\": $TRIALS, \"sessions\": $SMTP_SESSIONS,"
    echo "\"small\": [$SMTP_MSGS, $SMTP_SIZE], \"large\": [$SMTP_LARGE_MSGS, $SMTP_LARGE_SIZE]"
    echo "}"
} >"$OUT/env.json"

# Other load on the same cores skews every figure: sample it while we run (bounded).
(
    end=$(( $(date +%s) + 3600 ))
    while [ "$(date +%s)" -lt "$end" ]; do
        { date +%T; cat /proc/loadavg; } >>"$OUT/loadavg.txt"
        sleep 5
    done
) &
SAMPLER=$!

ARGS[postfix]="--smtp-port $PORT_POSTFIX_SMTP --maildir-fmt $RUN/postfix/Maildir"
ARGS[aiosmtpd]="--smtp-port $PORT_AIOSMTPD_SMTP --maildir-fmt $RUN/aiosmtpd/Maildir"
[ -f "$RUN/postfix/pid" ] && ARGS[postfix]+=" --pid $(cat "$RUN/postfix/pid")"
[ -f "$RUN/aiosmtpd/pid" ] && ARGS[aiosmtpd]+=" --pid $(cat "$RUN/aiosmtpd/pid")"

read -r -a TLIST <<<"$TARGETS"
T0=$(date +%s)
for ((r = 0; r < TRIALS; r++)); do
    log "SMTP round $((r + 1))/$TRIALS (load: $(cut -d' ' -f1-3 /proc/loadavg))"
    for ((i = 0; i < ${#TLIST[@]}; i++)); do
        n=${TLIST[$(( (i + r) % ${#TLIST[@]} ))]}
        # shellcheck disable=SC2086
        env TRIALS=1 SMTP_APPEND=1 SMTP_MSGS="$SMTP_MSGS" SMTP_LARGE_MSGS="$SMTP_LARGE_MSGS" \
            "$SHARED_BENCH/run_target.sh" --name "$n" ${ARGS[$n]} --steps "$STEPS" >"$WORK/step.log" 2>&1
        cat "$WORK/step.log" >>"$OUT/bench.log"
        sed -n "s/^\[smtp\] \([^ ]*\) size=\([0-9]*\) .*'deliver_msgs_per_s': \([0-9.]*\).*/  \1 \2 B: \3 msgs\/s in Maildir/p; /FAILED\|error/p" \
            "$WORK/step.log" >&2
    done
done
log "all rounds done in $(( $(date +%s) - T0 ))s"

"$MAILSUITE_PYTHON" "$HERE/smtp_report.py" --results "$OUT" --md "$OUT/summary.md" \
    --load "$OUT/loadavg.txt"
echo "results: $OUT"
