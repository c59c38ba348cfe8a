"""LookupTable answers exactly what a dict would, in dict mode and in array mode."""

import random

import pytest

from kith.services.lookup_table import HASH_LENGTH, LookupTable
from kith.services.threepid import lookup_hash


def h(i: int) -> str:
    return lookup_hash("email", f"user{i}@example.org", "pepper")


def expected(model: dict[str, str], asked: list[str]) -> dict[str, str]:
    return {x: model[x] for x in asked if x in model}


# small_max=0: arrays from the start; 50: a dict that outgrows itself mid-test.
@pytest.mark.parametrize("small_max", [0, 50, 100_000])
def test_random_binds_and_unbinds_match_a_dict(small_max: int) -> None:
    rng = random.Random(7)
    table, model = LookupTable(small_max=small_max), {}
    for step in range(6000):
        key = h(rng.randrange(1500))
        mxid = None if rng.random() < 0.25 else f"@u{rng.randrange(10**6)}:example.org"
        if step % 500 == 0:  # now and then a batch, as the LDAP sync and start-up write
            batch = [(h(rng.randrange(1500)), f"@b{step}_{i}:example.org" if i % 4 else None)
                     for i in range(40)]
            table.update(batch)
            for k, m in batch:
                model.pop(k, None) if m is None else model.__setitem__(k, m)
        table.set(key, mxid)
        model.pop(key, None) if mxid is None else model.__setitem__(key, mxid)
    assert len(table) == len(model)
    asked = [h(i) for i in range(2000)]
    assert table.find(asked) == expected(model, asked)
    assert all(table.get(x) == model.get(x) for x in asked)
    for size in (1, 15, 16, 17, 100):
        assert table.find(asked[:size]) == expected(model, asked[:size])


@pytest.mark.parametrize("small_max", [0, 100_000])
def test_hashes_sharing_a_bucket_and_fingerprint(small_max: int) -> None:
    # Only the first 16 characters place a hash and make its fingerprint: these 40
    # collide completely, overflow their bucket into the next ones, and only the whole
    # hash tells them apart.
    prefix = h(-1)[:16]
    crowd = [prefix + h(i)[16:] for i in range(40)]
    table = LookupTable(small_max=small_max)
    for i, key in enumerate(crowd[::2]):
        table.set(key, f"@even{i}:example.org")
    asked = crowd + [h(i) for i in range(30)]
    want = {key: f"@even{i}:example.org" for i, key in enumerate(crowd[::2])}
    assert table.find(asked) == want
    assert [table.get(key) for key in crowd[1::2]] == [None] * 20
    table.update([(key, "@odd:example.org") for key in crowd[1::2]])
    assert table.find(crowd[1::2]) == dict.fromkeys(crowd[1::2], "@odd:example.org")


@pytest.mark.parametrize("small_max", [0, 100_000])
def test_strings_that_are_not_hashes_never_match(small_max: int) -> None:
    table = LookupTable(small_max=small_max)
    good = [h(i) for i in range(20)]
    table.update((x, "@alice:example.org") for x in good)
    table.set("short", "@mallory:example.org")  # not kept: it could never be asked for
    odd = ["", "short", h(0)[:-1], h(0) + "A", "é" * HASH_LENGTH, h(1)[:42] + "\n",
           h(2)[:20] + "\n" + h(2)[21:], h(3)[:42], h(3)[42] + h(4)]
    assert table.find(odd) == {}
    assert table.find(odd + good) == dict.fromkeys(good, "@alice:example.org")
    # lengths that add up to whole hashes must not shift the others
    assert table.find([h(5)[:42], h(5)[42] + h(6)] * 10 + good[:1]) == {
        good[0]: "@alice:example.org"}
    assert len(table) == 20


def test_unbind_and_bind_again_with_a_longer_mxid() -> None:
    table = LookupTable(small_max=0)
    keys = [h(i) for i in range(100)]
    table.update((x, "@a:example.org") for x in keys)
    table.update((x, None) for x in keys[:50])
    assert len(table) == 50
    assert table.find(keys) == dict.fromkeys(keys[50:], "@a:example.org")
    long_mxid = "@" + "x" * 200 + ":example.org"
    table.set(keys[0], long_mxid)
    assert table.get(keys[0]) == long_mxid
    assert table.find(keys[:20]) == {keys[0]: long_mxid}
    assert table.get(keys[99]) == "@a:example.org"
    assert len(table) == 51


def test_grows_far_past_its_first_size() -> None:
    table = LookupTable(small_max=0)
    keys = [h(i) for i in range(20_000)]
    for start in range(0, 10_000, 1000):
        table.update((x, f"@{x[:8]}:example.org") for x in keys[start:start + 1000])
    for x in keys[10_000:10_500]:  # one by one, as binds arrive
        table.set(x, f"@{x[:8]}:example.org")
    assert len(table) == 10_500
    found = table.find(keys)
    assert len(found) == 10_500
    assert all(found[x] == f"@{x[:8]}:example.org" for x in keys[:10_500])
