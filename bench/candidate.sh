#!/usr/bin/env bash
# Starts kith as the shared benchmark's candidate: `bench/candidate.sh CMD...`.
#
# The benchmark is one account on one address looking up millions of addresses a
# second; kith's default lookup budget (20k addresses a minute per account) would refuse
# it after a moment.  This adds to the generated sydent.conf a budget no load generator
# reaches, so every lookup still pays for the budget check but none is refused.
set -euo pipefail
conf=${SYDENT_CONF:?SYDENT_CONF must name the generated config}
if ! grep -q '^lookup\.budget\.' "$conf"; then
  sed -i '/^\[general\]/a lookup.budget.account = 1000000000000\nlookup.budget.ip = 1000000000000' "$conf"
fi
exec "$@"
