"""The answer cache shared by the LDAP directory and the upstream identity server."""

from __future__ import annotations

from kith.caches import AnswerCache
from tests.test_breaker import Clock  # the breaker's tests' settable clock


def test_positive_and_negative_answers_live_for_their_own_times() -> None:
    clock = Clock()
    cache: AnswerCache[str, str] = AnswerCache(300, 60, clock=clock)
    cache.remember(["far", "none"], {"far": "@far:hs.test", "stray": "@stray:hs.test"})
    assert cache.split(["far", "none", "stray"]) == ({"far": "@far:hs.test"}, ["stray"])
    clock.now += 59.9
    assert cache.split(["far", "none"]) == ({"far": "@far:hs.test"}, [])
    clock.now += 0.1  # "nobody" is asked again after 60 s, a mapping after 300 s
    assert cache.split(["far", "none"]) == ({"far": "@far:hs.test"}, ["none"])
    clock.now += 240
    assert cache.split(["far", "none"]) == ({}, ["far", "none"])


def test_a_zero_ttl_keeps_nothing() -> None:
    cache: AnswerCache[str, str] = AnswerCache(0, 0, clock=Clock())
    cache.remember(["far", "none"], {"far": "@far:hs.test"})
    assert len(cache) == 0
    assert cache.split(["far", "none"]) == ({}, ["far", "none"])


def test_a_full_cache_drops_the_least_recently_used_answer_only() -> None:
    clock = Clock()
    cache: AnswerCache[int, str] = AnswerCache(300, 300, maxsize=100, clock=clock)
    cache.remember(range(100), {i: f"@u{i}:hs.test" for i in range(0, 100, 2)})
    cache.split([0])  # used: kept
    cache.remember([100], {})
    assert len(cache) == 100
    found, missing = cache.split(range(101))
    assert missing == [1]  # the oldest unused, not everything
    assert 0 in found and 100 not in found


def test_an_expired_answer_makes_room_before_a_used_one() -> None:
    clock = Clock()
    cache: AnswerCache[int, str] = AnswerCache(300, 10, maxsize=2, clock=clock)
    cache.remember([1, 2], {1: "@one:hs.test"})  # 2: "nobody", for 10 s
    clock.now += 10
    cache.remember([3], {3: "@three:hs.test"})
    assert cache.split([1, 2, 3]) == ({1: "@one:hs.test", 3: "@three:hs.test"}, [2])
