#!/bin/sh
# IMAP benchmarks for mailsuite with the shared harness (../shared/bench): a big INBOX of
# 10,000 and 100,000 messages written straight into the Maildir (imap_bigbox.py: SELECT,
# UID FETCH 1:* (FLAGS), FETCH 1:* (ENVELOPE), UID SEARCH UNSEEN; cold then warm trials) and the
# memory of 1,000 idle IMAP connections (idle_conns.py: LOGIN + SELECT INBOX, then idle).
# Dovecot is measured by ../shared/bench/run_peers.sh; compare in the same run.
#   bench/imap_bench.sh [OUTDIR]        (SIZES="10000 100000" TRIALS=3 IDLE_N=1000)
set -eu
HERE=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${SHARED:-$HERE/../shared/bench}
OUT=${1:-$(mktemp -d /tmp/mailsuite-imap-bench.XXXXXX)}
SIZES=${SIZES-"10000 100000"}
TRIALS=${TRIALS:-3}
IDLE_N=${IDLE_N:-1000}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
PORT=$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$OUT/mailsuite.toml" <<TOML
[server]
hostname = "bench.example.test"
data_dir = "data"
[listen]
imap = ["tcp:$PORT:interface=127.0.0.1"]
[domains]
local = ["example.test"]
[auth]
allow_plaintext = true
max_failures_per_ip = 1000  # idle_conns.py logs in 50 at a time from one IP
TOML
for u in idle $(for n in $SIZES; do echo big$n; done); do
  echo benchpass | $PY -m mailsuite.cli --config "$OUT/mailsuite.toml" user add "$u@example.test" --password-stdin >/dev/null
done
(cd "$OUT" && $PY -c "from twisted.scripts.twistd import run; run()" -n --logfile twistd.log --pidfile "" \
   mailsuite --config mailsuite.toml & echo $! > "$OUT/pid")
PID=$(cat "$OUT/pid")
trap 'kill $PID 2>/dev/null || true' EXIT
for i in $(seq 100); do $PY -c "import socket; socket.create_connection(('127.0.0.1',$PORT))" 2>/dev/null && break; sleep 0.1; done
for n in $SIZES; do
  (cd "$SHARED" && $PY imap_bigbox.py --name mailsuite --port "$PORT" --user "big$n@example.test" \
     --password benchpass --maildir "$OUT/data/mail/example.test/big$n" --count "$n" --generate \
     --trials "$TRIALS" --out "$OUT/imap-bigbox-$n-mailsuite.json")
done
(cd "$SHARED" && $PY idle_conns.py --name mailsuite --proto imap --port "$PORT" --user idle@example.test \
   --password benchpass --pid "$PID" --n "$IDLE_N" --out "$OUT/idle-imap-mailsuite.json")
echo "results in $OUT"
