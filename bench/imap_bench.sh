#!/bin/sh
# IMAP benchmark of mailsuite side by side with Dovecot, in one run on this machine, with the
# shared harness (../shared/bench):
#   - a big INBOX of 10,000 and 100,000 messages written straight into each server's Maildir
#     (imap_bigbox.py: SELECT, UID FETCH 1:* (FLAGS), FETCH 1:* (ENVELOPE), UID SEARCH UNSEEN;
#     a cold trial, then TRIALS warm ones; the two servers alternate per size);
#   - the memory of IDLE_N idle IMAP connections (idle_conns.py: LOGIN + SELECT INBOX, then idle).
# Prints warm medians and the ratio mailsuite / Dovecot (below 1: mailsuite is faster / smaller).
# Loopback only; both servers get free ports and their own directories under OUTDIR; everything
# started here is stopped on exit (by PID).  Dovecot comes from ../shared/bench/peers.sh (run
# ../shared/bench/setup-peers.sh once per machine); PEER=none measures mailsuite alone.
#   - with COLD_ROUNDS=N: the first SELECT again N times per server, alternating, the index
#     files removed and mailsuite restarted before each (cold_select.py); BIGBOX=0 skips the
#     big-box timings and only writes the Maildirs for it.
#     COMPARE_TREE=DIR adds to those rounds a second mailsuite run from the checkout DIR (through
#     PYTHONPATH; target "mailsuite-base"), so a change and the code before it meet Dovecot in
#     the same rounds.
#   bench/imap_bench.sh [OUTDIR]        (SIZES="10000 100000" TRIALS=3 IDLE_N=1000 PEER=dovecot
#                                        COLD_ROUNDS=0 BIGBOX=1 COMPARE_TREE= WORKERS=1)
set -eu
HERE=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${SHARED:-$HERE/../shared/bench}
OUT=${1:-$(mktemp -d /var/tmp/mailsuite-imap-bench.XXXXXX)}
SIZES=${SIZES-"10000 100000"}
TRIALS=${TRIALS:-3}
IDLE_N=${IDLE_N:-1000}
PEER=${PEER:-dovecot}
PY=${PYTHON:-python3}
COLD_ROUNDS=${COLD_ROUNDS:-0}
BIGBOX=${BIGBOX:-1}
COMPARE_TREE=${COMPARE_TREE:-}
# one process by default: a restarted server with worker processes answers on its socket while
# the workers still import, which the first SELECT of a cold round would wait for
WORKERS=${WORKERS:-1}
mkdir -p "$OUT"
# mktemp makes it 0700: Dovecot's auth process (its own account) must pass through it to the
# passwd file under peers/, or every login is "Temporary authentication failure"
chmod go+x "$OUT"
OUT=$(cd "$OUT" && pwd)
free_port() { $PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do $PY -c "import socket; socket.create_connection(('127.0.0.1',$1))" 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 did not open" >&2; return 1; }
PORT=$(free_port)
ulimit -n 65536 2>/dev/null || true

# -- mailsuite --------------------------------------------------------------------------------
cat > "$OUT/mailsuite.toml" <<TOML
[server]
hostname = "bench.example.test"
data_dir = "data"
workers = $WORKERS
[listen]
imap = ["tcp:$PORT:interface=127.0.0.1"]
[domains]
local = ["example.test"]
[auth]
allow_plaintext = true
max_failures_per_ip = 1000  # idle_conns.py logs in 50 at a time from one IP
[imap]
max_connections = 0  # 1,000 idle sessions of one user from one address
max_connections_per_ip = 0
max_userip_connections = 0
TOML
for u in idle $(for n in $SIZES; do echo big$n; done); do
  echo benchpass | $PY -m mailsuite.cli --config "$OUT/mailsuite.toml" user add "$u@example.test" --password-stdin >/dev/null 2>&1 || true
done
start_mailsuite() {
  (cd "$OUT" && exec $PY -c "from twisted.scripts.twistd import run; run()" -n --logfile twistd.log --pidfile "" \
     mailsuite --config mailsuite.toml) &
  PID=$!
}
start_mailsuite
# -- the same server from another checkout (COMPARE_TREE), for the cold rounds ------------------
BPID=""
if [ -n "$COMPARE_TREE" ]; then
  BPORT=$(free_port)
  mkdir -p "$OUT/base"
  sed "s/tcp:$PORT:/tcp:$BPORT:/" "$OUT/mailsuite.toml" > "$OUT/base/mailsuite.toml"
  for n in $SIZES; do
    echo benchpass | PYTHONPATH="$COMPARE_TREE" $PY -m mailsuite.cli --config "$OUT/base/mailsuite.toml" \
      user add "big$n@example.test" --password-stdin >/dev/null 2>&1 || true
  done
fi
start_base() {
  (cd "$OUT/base" && PYTHONPATH="$COMPARE_TREE" exec $PY -c "from twisted.scripts.twistd import run; run()" \
     -n --logfile twistd.log --pidfile "" mailsuite --config mailsuite.toml) &
  BPID=$!
}
DPID=""
cleanup() {
  kill "$PID" 2>/dev/null || true
  [ -z "$BPID" ] || kill "$BPID" 2>/dev/null || true
  if [ "$PEER" = dovecot ]; then
    (cd "$SHARED" && RUN="$OUT/peers" PORT_DOVECOT_IMAP=$DPORT PORT_DOVECOT_POP3=$DPORT3 \
       BIGBOX_SIZES="$SIZES" ./peers.sh stop dovecot >/dev/null 2>&1) || true
  fi
}
trap cleanup EXIT
trap 'exit 1' INT TERM
wait_port "$PORT"

# -- Dovecot (its own instance: config, users and Maildirs under OUTDIR/peers) -------------------
if [ "$PEER" = dovecot ]; then
  DPORT=$(free_port); DPORT3=$(free_port)
  (cd "$SHARED" && RUN="$OUT/peers" PORT_DOVECOT_IMAP=$DPORT PORT_DOVECOT_POP3=$DPORT3 \
     BIGBOX_SIZES="$SIZES" ./peers.sh start dovecot)
  for _ in $(seq 100); do  # the master writes its pid file a moment after it listens
    DPID=$(cat "$OUT/peers/dovecot/run/master.pid" 2>/dev/null || true)
    [ -n "$DPID" ] && break
    sleep 0.1
  done
  [ -n "$DPID" ] || { echo "dovecot did not start (see $OUT/peers/dovecot)" >&2; exit 1; }
  BENCH_UID=$(bash -c ". '$SHARED/env.sh' && echo \$BENCH_UID")  # owner of Dovecot's Maildirs
fi

bigbox() {  # NAME PORT USER MAILDIR N [extra args]
  (cd "$SHARED" && $PY imap_bigbox.py --name "$1" --port "$2" --user "$3" --password benchpass \
     --maildir "$4" --count "$5" --generate --trials "$TRIALS" --out "$OUT/imap-bigbox-$5-$1.json" \
     ${6:-} >/dev/null)
}
for n in $SIZES; do
  MS_BOX="$OUT/data/mail/example.test/big$n"
  DC_BOX="$OUT/peers/dovecot/users/big$n/Maildir"
  if [ "$BIGBOX" = 1 ]; then
    echo "bigbox $n: mailsuite" >&2
    bigbox mailsuite "$PORT" "big$n@example.test" "$MS_BOX" "$n"
    if [ "$PEER" = dovecot ]; then
      echo "bigbox $n: dovecot" >&2
      bigbox dovecot "$DPORT" "big$n" "$DC_BOX" "$n" "--uid $BENCH_UID"
    fi
  else
    echo "writing $n messages for each server" >&2
    (cd "$SHARED" && $PY gen_maildir.py --maildir "$MS_BOX" --count "$n" --clear >/dev/null)
    if [ "$PEER" = dovecot ]; then
      (cd "$SHARED" && $PY gen_maildir.py --maildir "$DC_BOX" --count "$n" --clear \
         --uid "$BENCH_UID" --gid "$BENCH_UID" >/dev/null)
    fi
  fi
  BASE_BOX="$OUT/base/data/mail/example.test/big$n"
  if [ -n "$COMPARE_TREE" ] && [ "$COLD_ROUNDS" -gt 0 ]; then
    (cd "$SHARED" && $PY gen_maildir.py --maildir "$BASE_BOX" --count "$n" --clear >/dev/null)
  fi
  if [ "$COLD_ROUNDS" -gt 0 ]; then
    echo "cold SELECT $n: $COLD_ROUNDS rounds" >&2
    TG="--target mailsuite:$PORT:big$n@example.test:$MS_BOX"
    [ -n "$COMPARE_TREE" ] && TG="$TG --target mailsuite-base:$BPORT:big$n@example.test:$BASE_BOX"
    [ "$PEER" = dovecot ] && TG="$TG --target dovecot:$DPORT:big$n:$DC_BOX"
    for r in $(seq "$COLD_ROUNDS"); do
      # a fresh mailsuite process each round: a running one keeps the folder warm
      kill "$PID"; wait "$PID" 2>/dev/null || true
      start_mailsuite
      wait_port "$PORT"
      if [ -n "$COMPARE_TREE" ]; then
        [ -z "$BPID" ] || { kill "$BPID"; wait "$BPID" 2>/dev/null || true; }
        start_base
        wait_port "$BPORT"
      fi
      PIDS="--pid mailsuite=$PID"
      [ -n "$COMPARE_TREE" ] && PIDS="$PIDS --pid mailsuite-base=$BPID"
      [ "$PEER" = dovecot ] && PIDS="$PIDS --pid dovecot=$DPID"
      # shellcheck disable=SC2086
      $PY "$HERE/bench/cold_select.py" --round "$r" --password benchpass $TG $PIDS \
        --out "$OUT/cold-select-$n-$r.json"
    done
    $PY "$HERE/bench/cold_select.py" --report "$OUT"/cold-select-"$n"-*.json | tee "$OUT/cold-select-$n.txt"
  fi
done
if [ "$IDLE_N" -gt 0 ]; then
  echo "idle $IDLE_N: mailsuite" >&2
  (cd "$SHARED" && $PY idle_conns.py --name mailsuite --proto imap --port "$PORT" --user idle@example.test \
     --password benchpass --pid "$PID" --n "$IDLE_N" --out "$OUT/idle-imap-mailsuite.json" >/dev/null)
  if [ "$PEER" = dovecot ]; then
    echo "idle $IDLE_N: dovecot" >&2
    (cd "$SHARED" && $PY idle_conns.py --name dovecot --proto imap --port "$DPORT" --user idle \
       --password benchpass --pid "$DPID" --n "$IDLE_N" --out "$OUT/idle-imap-dovecot.json" >/dev/null)
  fi
fi

# -- the table ------------------------------------------------------------------------------------
[ "$BIGBOX" = 1 ] || { echo "results in $OUT"; exit 0; }
$PY - "$OUT" "$SIZES" <<'PYEOF'
import json, sys
from pathlib import Path
out, sizes = Path(sys.argv[1]), sys.argv[2].split()
def load(name):
    p = out / name
    return json.loads(p.read_text()) if p.exists() else None
ops = ["select", "uid_fetch_flags", "fetch_envelope", "uid_search_unseen"]
print(f"{'IMAP, warm median (s)':<34}{'mailsuite':>11}{'dovecot':>11}{'ratio':>8}   cold: mailsuite / dovecot")
for n in sizes:
    m, d = load(f"imap-bigbox-{n}-mailsuite.json"), load(f"imap-bigbox-{n}-dovecot.json")
    for op in ops:
        mv = m["warm_imaplib"][op]["median"]
        dv = d["warm_imaplib"][op]["median"] if d else None
        ratio = f"{mv / dv:8.2f}" if dv else "       -"
        cold = f"{m['cold_imaplib'][op]:.3f} / " + (f"{d['cold_imaplib'][op]:.3f}" if d else "-")
        print(f"{op + ' n=' + n:<34}{mv:>11.4f}{(dv if dv is not None else float('nan')):>11.4f}{ratio}   {cold}")
    ok = m["checks_ok"] and (d is None or d["checks_ok"])
    if not ok:
        print(f"  n={n}: result checks FAILED (see the JSON files)")
mi, di = load("idle-imap-mailsuite.json"), load("idle-imap-dovecot.json")
if mi:
    for k in ("rss", "pss"):
        mv = mi["per_conn_kib"][k]
        dv = di["per_conn_kib"][k] if di else None
        ratio = f"{mv / dv:8.2f}" if dv else "       -"
        print(f"{'idle conn KiB ' + k + ' n=' + str(mi['connected']):<34}{mv:>11.1f}{(dv if dv is not None else float('nan')):>11.1f}{ratio}")
PYEOF
echo "results in $OUT"
