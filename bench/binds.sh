#!/usr/bin/env bash
# Bind throughput of kith and Sydent 2.6.1, side by side in one run, driven by wrk.
#
#   bench/binds.sh [SECONDS] [ROUNDS] [KITH_WORKERS]     (defaults: 10 s, 2 rounds, 1 worker)
#
# kith stores into a fresh SQLite file, or, with KITH_DB_URL=postgresql://..., into that
# (empty) PostgreSQL database.
#
# The Python load generator of ../shared/bench tops out near 4k requests/s on this
# machine, below what kith binds; wrk (C, one thread) costs the shared cores far less.
# Each request binds a new address through POST /_matrix/identity/internal/bind with 32
# connections; the servers are measured in alternation (kith, Sydent, kith, Sydent, ...).
# MXIDs live on the shared benchmark's fake homeserver, so Sydent's onbind notifications
# succeed as they do in ../shared/bench (kith sends onbind only for pending invites).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
shared=${KITH_BENCH_DIR:-$root/../shared/bench}
seconds=${1:-10}
rounds=${2:-2}
workers=${3:-1}
command -v wrk >/dev/null || { echo "wrk is needed: apt-get install wrk" >&2; exit 1; }

eval "$("$shared/sydent_baseline.sh" start)"
py=$SYDENT_PYTHON
kdir=$(mktemp -d "${TMPDIR:-/tmp}/kith-binds.XXXXXX")
kport=$("$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
kiport=$("$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
sed -e "s/^clientapi.http.port = .*/clientapi.http.port = $kport/" \
    -e "s/^internalapi.http.port = .*/internalapi.http.port = $kiport/" \
    -e "s#^db.file = .*#db.file = $kdir/kith.db#" \
    -e "s#^pidfile.path = .*#pidfile.path = $kdir/kith.pid#" \
    -e "/^ed25519.signingkey/d" "$SYDENT_DIR/sydent.conf" > "$kdir/sydent.conf"
if [ -n "${KITH_DB_URL:-}" ]; then
  sed -i "s#^db.file = .*#&\ndb.url = ${KITH_DB_URL//%/%%}#" "$kdir/sydent.conf"
fi
(cd "$kdir" && SYDENT_CONF="$kdir/sydent.conf" exec "$root/.venv/bin/python" -m kith \
    --workers "$workers" >"$kdir/kith.log" 2>&1) &
kpid=$!
# The fake homeserver runs in a process of its own (multiprocessing "spawn" needs a
# script file), in a session of its own so that it is stopped with its group.
cat > "$kdir/fake_hs.py" <<'PY'
import sys, time
sys.path.insert(0, sys.argv[1])
import isbench
if __name__ == "__main__":
    isbench.start_fake_homeserver(48448)
    print("fake homeserver ready", flush=True)
    time.sleep(3600)
PY
setsid "$py" "$kdir/fake_hs.py" "$shared" &
hspid=$!
cleanup() {
  kill "$kpid" 2>/dev/null || true
  kill -- -"$hspid" 2>/dev/null || true
  "$shared/sydent_baseline.sh" stop "$SYDENT_DIR" >/dev/null 2>&1 || true
  rm -rf "$kdir" "$SYDENT_DIR"
}
trap cleanup EXIT
for _ in $(seq 1 100); do
  curl -fs "http://127.0.0.1:$kport/_matrix/identity/versions" >/dev/null 2>&1 && break
  sleep 0.2
done
sleep 2  # the fake homeserver

run() {  # run LABEL URL ROUND
  PREFIX="$1r$3x" MXID_DOMAIN=127.0.0.1:48448 wrk -t1 -c32 -d"${seconds}s" \
      -s "$here/wrk-bind.lua" "$2/_matrix/identity/internal/bind" | sed -n "s/^RESULT /$1 /p"
}
store=SQLite; [ -z "${KITH_DB_URL:-}" ] || store=PostgreSQL
echo "# kith's store: $store"
echo "# label binds/s p99_ms errors   (${seconds}s each, 32 connections, kith workers=$workers)"
for r in $(seq 1 "$rounds"); do
  run kith "http://127.0.0.1:$kiport" "$r"
  run sydent "$SYDENT_INTERNAL" "$r"
done
