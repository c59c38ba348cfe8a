#!/usr/bin/env bash
# kith's benchmark entry point: drives ../shared/bench (the load generator and the
# Sydent 2.6.1 runner) against kith from this checkout.
#
#   bench/run.sh side-by-side [SEED]   kith and Sydent 2.6.1 in one run (default 2000 bindings)
#   bench/run.sh alone [SEED]          kith alone (for seeds too large for Sydent, e.g. 1000000)
#
# Extra arguments after SEED go to compare.py (see ../shared/bench/README.md).
# Needs `wrk` (Debian package) on PATH. Results: bench/results/<mode>-<seed>-<date>.{txt,json}
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
shared=${KITH_BENCH_DIR:-$root/../shared/bench}
mode=${1:-side-by-side}
seed=${2:-2000}
shift $(( $# > 2 ? 2 : $# ))
[ -x "$root/.venv/bin/python" ] || { echo "run 'make install' first" >&2; exit 1; }
command -v wrk >/dev/null || { echo "wrk is needed: apt-get install wrk" >&2; exit 1; }
mkdir -p "$here/results"
out="$here/results/$mode-$seed-$(date -u +%Y%m%dT%H%M%SZ)"
args=(--candidate "$here/candidate.sh $root/.venv/bin/python -m kith" --seed "$seed" --wrk
      --concurrency 1,16 --duration 5 --json "$out.json")
case "$mode" in
  side-by-side) ;;
  alone) args+=(--no-sydent) ;;
  *) echo "usage: $0 side-by-side|alone [SEED] [compare.py options]" >&2; exit 2 ;;
esac
cd "$(mktemp -d)"
"$shared/bench.sh" "${args[@]}" "$@" 2>&1 | grep -v '^WARNING: Location' | tee "$out.txt"
