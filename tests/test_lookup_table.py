"""LookupTable and HashArrays answer exactly what a dict would."""

import json
import logging
import random
from collections.abc import Callable, Sequence

import pytest

from kith.services import lookup_table
from kith.services.lookup_table import (
    ARRAY_BATCH_MIN,
    COMPILED,
    HASH_LENGTH,
    HashArrays,
    LookupTable,
)
from kith.threepid import lookup_hash
from tests.conftest import KithFactory

B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def h(i: int) -> str:
    return lookup_hash("email", f"user{i}@example.org", "pepper")


def expected(model: dict[str, str], asked: list[str]) -> dict[str, str]:
    return {x: model[x] for x in asked if x in model}


MakeTable = Callable[[], LookupTable | HashArrays]


def answered(table: LookupTable | HashArrays, asked: Sequence[str]) -> dict[str, str]:
    """`find`'s answer, once `find_json` has said the same: the same mappings, each hash
    once, and how many."""
    found = table.find(asked)
    encoded, count = table.find_json(asked)
    pairs = json.loads(encoded, object_pairs_hook=list)
    assert dict(pairs) == found
    assert len(pairs) == count == len(found)
    return found


def tables() -> list[MakeTable]:
    # arrays alone, probed by the compiled probe and by numpy; a table with arrays from
    # the start; one that starts them mid-test
    return [lambda: HashArrays(compiled=True), lambda: HashArrays(compiled=False),
            lambda: LookupTable(arrays_from=0), lambda: LookupTable(arrays_from=50)]


def test_the_compiled_probe_is_built() -> None:
    """`make install-test` builds kith/_probe.c (a C compiler is needed, as .ci/run
    installs); without it every test of the compiled probe below would fail anyway,
    and this one says why."""
    assert COMPILED, "kith._probe is not built: pip install -e . needs a C compiler"


async def test_a_server_without_the_compiled_probe_says_so_at_start(
        kith_factory: KithFactory, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    said = "kith._probe is not built"
    with caplog.at_level(logging.WARNING, logger="kith.server"):
        await kith_factory({}, name="compiled")
    assert said not in caplog.text
    monkeypatch.setattr(lookup_table, "COMPILED", False)
    with caplog.at_level(logging.WARNING, logger="kith.server"):
        await kith_factory({}, name="numpy")
    assert said in caplog.text


def test_the_compiled_probe_and_numpy_answer_alike() -> None:
    """The same binds, unbinds and rebinds into both; every batch asked (hits, misses,
    unbound rows, duplicates, strings that are not hashes) answered the same."""
    rng = random.Random(5)
    compiled, numpy = HashArrays(compiled=True), HashArrays(compiled=False)
    for step in range(30):
        entries = [(h(rng.randrange(4000)),
                    None if rng.random() < 0.2 else "@" + "u" * rng.randrange(80) + ":x.org")
                   for _ in range(rng.choice([1, 5, 200]))]
        for table in (compiled, numpy):
            table.update(entries)
        asked = [h(rng.randrange(5000)) for _ in range(rng.choice([1, 15, 16, 100, 1500]))]
        asked += asked[:3] + ["", h(1)[:-1] + "B", "+" * HASH_LENGTH]
        assert answered(compiled, asked) == answered(numpy, asked), step
    assert len(compiled) == len(numpy)


def test_the_compiled_probe_ignores_what_is_not_a_string() -> None:
    table = HashArrays(compiled=True)
    table.update([(h(i), f"@u{i}:example.org") for i in range(20)])
    asked: list[object] = [None, 7, h(1).encode(), [h(2)], h(3), h(3)]
    assert answered(table, asked) == {h(3): "@u3:example.org"}  # type: ignore[arg-type]
    assert answered(table, tuple(asked)) == {h(3): "@u3:example.org"}  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        table.find(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        table.find_json(42)  # type: ignore[arg-type]


@pytest.mark.parametrize("make", tables())
def test_random_binds_and_unbinds_match_a_dict(make: MakeTable) -> None:
    rng = random.Random(7)
    table, model = make(), dict[str, str]()
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
    assert answered(table, asked) == expected(model, asked)
    assert all(table.get(x) == model.get(x) for x in asked)
    for size in (1, 15, 16, 17, 100, ARRAY_BATCH_MIN - 1, ARRAY_BATCH_MIN):
        assert answered(table, asked[:size]) == expected(model, asked[:size])


@pytest.mark.parametrize("make", tables())
def test_hashes_sharing_a_bucket_and_fingerprint(make: MakeTable) -> None:
    # Only the first 16 characters place a hash and make its fingerprint: these 40
    # collide completely, overflow their bucket into the next ones, and only the whole
    # hash tells them apart.
    prefix = h(-1)[:16]
    crowd = [prefix + h(i)[16:] for i in range(40)]
    table = make()
    for i, key in enumerate(crowd[::2]):
        table.set(key, f"@even{i}:example.org")
    asked = crowd + [h(i) for i in range(ARRAY_BATCH_MIN)]
    want = {key: f"@even{i}:example.org" for i, key in enumerate(crowd[::2])}
    assert answered(table, asked) == want
    assert [table.get(key) for key in crowd[1::2]] == [None] * 20
    table.update([(key, "@odd:example.org") for key in crowd[1::2]])
    assert answered(table, crowd[1::2]) == dict.fromkeys(crowd[1::2], "@odd:example.org")


@pytest.mark.parametrize("make", tables())
def test_strings_that_are_not_hashes_never_match(make: MakeTable) -> None:
    table = make()
    good = [h(i) for i in range(20)]
    table.update((x, "@alice:example.org") for x in good)
    table.set("short", "@mallory:example.org")  # not kept: it could never be asked for
    odd = ["", "short", h(0)[:-1], h(0) + "A", "é" * HASH_LENGTH, h(1)[:42] + "\n",
           h(2)[:20] + "\n" + h(2)[21:], h(3)[:42], h(3)[42] + h(4),
           # another alphabet's characters, and a last character no digest ends with
           h(7)[:10] + "+" + h(7)[11:], h(8)[:10] + "=" + h(8)[11:],
           *(good[9][:42] + c for i, c in enumerate(B64URL) if i % 4)]
    assert answered(table, odd) == {}
    assert answered(table, odd * 30) == {}
    assert answered(table, odd + good) == dict.fromkeys(good, "@alice:example.org")
    assert answered(table, odd * 30 + good) == dict.fromkeys(good, "@alice:example.org")
    # lengths that add up to whole hashes must not shift the others
    assert answered(table, [h(5)[:42], h(5)[42] + h(6)] * 200 + good[:1]) == {
        good[0]: "@alice:example.org"}
    assert len(table) == 20


@pytest.mark.parametrize("make", tables())
def test_unbind_and_bind_again_with_a_longer_mxid(make: MakeTable) -> None:
    table = make()
    keys = [h(i) for i in range(100)]
    table.update((x, "@a:example.org") for x in keys)
    table.update((x, None) for x in keys[:50])
    assert len(table) == 50
    assert answered(table, keys) == dict.fromkeys(keys[50:], "@a:example.org")
    long_mxid = "@" + "x" * 200 + ":example.org"
    table.set(keys[0], long_mxid)
    assert table.get(keys[0]) == long_mxid
    assert answered(table, keys[:20]) == {keys[0]: long_mxid}
    assert table.get(keys[99]) == "@a:example.org"
    assert len(table) == 51


@pytest.mark.parametrize("make", tables())
def test_grows_far_past_its_first_size(make: MakeTable) -> None:
    table = make()
    keys = [h(i) for i in range(20_000)]
    for start in range(0, 10_000, 1000):
        table.update((x, f"@{x[:8]}:example.org") for x in keys[start:start + 1000])
    for x in keys[10_000:10_500]:  # one by one, as binds arrive
        table.set(x, f"@{x[:8]}:example.org")
    assert len(table) == 10_500
    found = answered(table, keys)
    assert len(found) == 10_500
    assert all(found[x] == f"@{x[:8]}:example.org" for x in keys[:10_500])


@pytest.mark.parametrize("make", tables())
def test_many_rebinds_keep_every_answer(make: MakeTable) -> None:
    # Each rebind leaves the old mxid's bytes behind; the table reclaims them as it goes.
    table, model = make(), dict[str, str]()
    keys = [h(i) for i in range(3000)]
    table.reserve(len(keys))
    for turn in range(12):
        batch = [(x, None if (i + turn) % 5 == 0 else f"@t{turn}_{i}{'x' * (turn % 4)}:e.org")
                 for i, x in enumerate(keys)]
        table.update(batch)
        for x, m in batch:
            model.pop(x, None) if m is None else model.__setitem__(x, m)
        for i in range(turn, 3000, 97):  # and some one by one
            mxid = f"@one{turn}_{i}:e.org"
            table.set(keys[i], mxid)
            model[keys[i]] = mxid
        assert len(table) == len(model)
    assert answered(table, keys) == model
    assert all(table.get(x) == model.get(x) for x in keys[::7])
    assert answered(table, keys[:10]) == expected(model, keys[:10])


def test_a_table_reserved_past_its_dict_answers_the_same() -> None:
    table = LookupTable(arrays_from=100)
    keys = [h(i) for i in range(300)]
    table.update((x, "@a:example.org") for x in keys[:100])
    table.reserve(200)
    table.update((x, "@b:example.org") for x in keys[100:])
    assert len(table) == 300
    assert answered(table, keys) == {**dict.fromkeys(keys[:100], "@a:example.org"),
                                **dict.fromkeys(keys[100:], "@b:example.org")}


@pytest.mark.parametrize("make", tables())
def test_mxids_of_every_length_and_with_nul_bytes_come_back_whole(make: MakeTable) -> None:
    """A batch reads short mxids as fixed windows; longer ones, and bytes a Matrix ID
    never holds (synced or replicated in, not checked), come back exactly too, and as
    JSON escapes them."""
    table = make()
    keys = [h(i) for i in range(300)]
    mxids = {k: "@" + "x" * (i % 120) + f":{i}.org" + "\0" * (i % 3) for i, k in enumerate(keys)}
    mxids[keys[7]] = "@é\0ü:example.org\0"
    mxids[keys[8]] = '@a"b\\c\x1f\x7f\t:example.org'  # what JSON must escape, and DEL
    table.update(mxids.items())
    assert answered(table, keys) == mxids
    assert all(table.get(k) == m for k, m in mxids.items())


@pytest.mark.parametrize("make", tables())
def test_an_mxid_far_longer_than_a_matrix_id_is_kept_whole(make: MakeTable) -> None:
    """No valid Matrix ID is longer than 255 bytes, but an imported row is not checked:
    the index keeps what it is given rather than failing its load."""
    table = make()
    keys = [h(i) for i in range(40)]
    huge = "@" + "x" * 70_000 + ":example.org"
    table.update([(k, huge if i == 3 else f"@u{i}:example.org") for i, k in enumerate(keys)])
    assert table.get(keys[3]) == huge
    assert answered(table, keys)[keys[3]] == huge
    assert len(answered(table, keys)) == 40


def packed(entries: list[tuple[str, str]]) -> tuple[str, str, int]:
    return "".join(k for k, _ in entries), "\n".join(m for _, m in entries), len(entries)


@pytest.mark.parametrize("make", [*tables(), lambda: LookupTable(arrays_from=10**6)])
def test_packed_updates_match_a_dict(make: MakeTable) -> None:
    """update_packed (how a start loads the store) leaves what update would: new and
    already held hashes, mxids of every length (past a window, non-ASCII, ending in
    NUL), several batches, in any mode of the table."""
    rng = random.Random(11)
    table, model = make(), dict[str, str]()
    odd = ["@ü:example.org", "@nul\x00", "@" + "l" * 300 + ":example.org", "@x:y"]
    for batch in range(8):
        keys = rng.sample(range(3000), 400)
        entries = [(h(k), odd[k % 4] if k % 97 == 0 else f"@p{batch}_{k}:example.org")
                   for k in keys]
        assert table.update_packed(*packed(entries))
        model.update(entries)
    asked = [h(i) for i in range(3200)]
    assert answered(table, asked) == expected(model, asked)
    assert all(table.get(x) == model.get(x) for x in asked[:500])
    assert len(table) == len(model)


@pytest.mark.parametrize("entries", [
    [(h(1), "@a:x"), (h(2)[:-1], "@b:x")],           # a hash one character short
    [(h(1), "@a:x"), (h(2) + "A", "@b:x")],          # one too long
    [(h(1), "@a\n:x"), (h(2), "@b:x")],              # a newline in an mxid
    [(h(1), "@a:x"), ("é" * HASH_LENGTH, "@b:x")],   # not ASCII
])
@pytest.mark.parametrize("arrays_from", [0, 10**6])
def test_packed_updates_that_cannot_be_unpacked_change_nothing(
        arrays_from: int, entries: list[tuple[str, str]]) -> None:
    table = LookupTable(arrays_from=arrays_from)  # (it checks the shape for the arrays)
    table.set(h(3), "@c:x")
    assert not table.update_packed(*packed(entries))
    assert answered(table, [h(1), h(2), h(3)]) == {h(3): "@c:x"}


@pytest.mark.parametrize("make", tables())
def test_a_packed_update_naming_a_hash_twice_changes_nothing(make: MakeTable) -> None:
    table = make()
    table.set(h(3), "@c:x")
    entries = [(h(1), "@a:x")] * 2 + [(h(i), f"@{i}:x") for i in range(10, 30)]
    if isinstance(table, LookupTable) and table._arrays is None:
        # A dict takes the last; only the arrays cannot hold a hash twice.
        assert table.update_packed(*packed(entries))
        assert answered(table, [h(1), h(3), h(10)]) == {h(1): "@a:x", h(3): "@c:x", h(10): "@10:x"}
        return
    assert not table.update_packed(*packed(entries))
    assert answered(table, [h(1), h(3), h(10)]) == {h(3): "@c:x"}
