#!/usr/bin/env python3
"""What a lookup pays for the lookup budgets, timed in-process.

Every lookup (v1 and v2) builds its `Requester` (the client address, read through the
X-Forwarded-For rule and keyed by /64 for IPv6, and the account) and spends its
addresses from the account's and the address's budgets, in memory
(kith.services.limits.LookupBudget).  Each is timed here on its own, the best of
several repeats, so that other load on a shared machine does not count; throughput
under wrk (bench/ab.py) moves by more than this costs.

    .venv/bin/python bench/budget_cost.py
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Callable

from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from kith.api.http import OBEY_X_FORWARDED_FOR, requester
from kith.config import DbConfig
from kith.services.accounts import Account
from kith.services.limits import LookupBudget, Requester
from kith.store import Store

CALLS = 200_000
REPEATS = 7
LIFTED = 10**12  # addresses a minute: never refused, always counted


class Transport:
    """What a request reads its client address from."""

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("192.0.2.1", 5555) if name == "peername" else default


def best_us(call: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(REPEATS):
        started = time.perf_counter()
        for _ in range(CALLS):
            call()
        best = min(best, time.perf_counter() - started)
    return best / CALLS * 1e6


async def main() -> None:
    with tempfile.TemporaryDirectory() as directory:
        store = await Store.open(DbConfig(file=f"{directory}/kith.db"))
        try:
            budget = LookupBudget(store, LIFTED, LIFTED)
            alice = Requester(ip="192.0.2.1", user_id="@alice:hs.test")
            app = web.Application()
            app[OBEY_X_FORWARDED_FOR] = False
            request = make_mocked_request("POST", "/_matrix/identity/v2/lookup", app=app,
                                          transport=Transport())
            account = Account("@alice:hs.test", None)
            figures = {
                "spend(1), account and address": best_us(lambda: budget.spend(1, alice)),
                "spend(1000), account and address":
                    best_us(lambda: budget.spend(1000, alice)),
                "spend(1), address only (v1)":
                    best_us(lambda: budget.spend(1, Requester(ip="192.0.2.1"))),
                "requester(request, account)": best_us(lambda: requester(request, account)),
            }
        finally:
            await store.close()
    for what, us in figures.items():
        print(f"{what:36s} {us:6.3f} µs")


if __name__ == "__main__":
    asyncio.run(main())
