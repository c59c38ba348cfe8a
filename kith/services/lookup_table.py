"""lookup hash → mxid: a dict while the map is small, compact flat arrays once it is big.

A Python dict costs about 300 bytes a binding (a 43-character key object, an mxid
object, the table), and with a million bindings nearly every probe misses the CPU
caches several times over (the table, the entry, the key object, the value object).
`HashArrays` keeps the map in a few flat arrays instead: a bucketed hash table of packed
(fingerprint, row) slots, each hash's 43 characters by row, and the mxids as UTF-8
in one byte buffer with an offset and a length by row; about 120 bytes a binding.  A
batch of addresses is found by the compiled probe (kith/_probe.c) in one pass, which
can also write the answer as JSON straight from the arrays (`find_json`), or, where it
was not built, by a few dozen array operations whose memory accesses overlap and one
address by a few probes in Python (docs/decisions.md has the figures).

Lookup hashes are the 43 characters of unpadded URL-safe base64 of a sha256 digest;
anything else (another length, another alphabet, a last character that no digest
encodes to) is never stored, so it can never match.  Rows are never freed: unbinding
empties a row's mxid and binding the same hash again fills it, so the arrays grow only
with distinct hashes.
"""

from __future__ import annotations

import re
import secrets
import struct
import sys
from collections.abc import Iterable, Sequence
from operator import itemgetter
from typing import Any, TypeVar, cast

import msgspec
import numpy as np
import numpy.typing as npt

try:
    from kith import _probe
except ImportError:  # installed without a C compiler: numpy answers
    _probe = None  # type: ignore[assignment]

HASH_LENGTH = 43
# (kith/_probe.c reads the same layout: the key, the pad, the bucket, the packed mxid
# word and the mixing; a change here is a change there, which the tests that ask both
# probes the same would show.)
# A key is a hash and a pad that starts with a newline, 48 bytes: six aligned
# little-endian words, so that whole keys compare in six vector operations (w0 and w1
# also feed the hash function).
_PAD = b"\n    "
_KEY = HASH_LENGTH + len(_PAD)
_WORDS = _KEY // 8
# What a lookup hash can be: 43 characters of URL-safe base64, the last of which
# carries the digest's last 4 bits and two zero bits.
_HASH = re.compile(r"[A-Za-z0-9_-]{42}[AEIMQUYcgkosw048]")
_HEAD = struct.Struct("<QQ")
_BUCKET = 8        # slots per bucket: one 64-byte cache line of uint64
_MAX_LOAD = 0.375  # rows per slot before the table doubles
_MIN_BUCKETS = 16
_MIN_ROWS = 64
_GROWTH = 1.25     # rows and mxid bytes grow by a quarter: little unused at 10M rows
# Up to this many hashes a dict answers fastest and costs little; past it, the arrays
# alone keep the map (docs/decisions.md).
ARRAYS_FROM = 100_000
# Without the compiled probe, batches this big or bigger are answered with array
# operations; smaller ones hash by hash (the array operations cost a fixed ~30 µs).
ARRAY_BATCH_MIN = 16
# Below this many entries an update is cheaper one by one than in array operations.
_VECTOR_MIN = 16
# A batch gathers each mxid found as the `_WINDOW` bytes from its start, cut at its
# length by a mask: fixed-width copies, and numpy makes the bytes objects.  Longer mxids
# (and any ending in NUL) are read one by one.  The text keeps `_WINDOW` spare bytes at
# its end, so that every window lies within it.
_WINDOW = 48
# A row's mxid: where it starts in the text (40 bits: 1 TiB) and its length (24 bits).
_REF_SHIFT, _REF_LENGTH = 24, (1 << 24) - 1
_CUTS = (np.arange(_WINDOW)[None, :] < np.arange(_WINDOW + 1)[:, None]).astype(np.uint8) * 255
_M64 = (1 << 64) - 1
_M32 = (1 << 32) - 1
_LOW32, _ONE, _THIRTY_TWO = np.uint64(_M32), np.uint64(1), np.uint64(32)
_NEWLINE = np.uint8(ord("\n"))

if sys.byteorder != "little":  # slots and hashes are read by their 32-bit halves
    raise ImportError("kith's lookup index needs a little-endian machine")

_encode = msgspec.json.Encoder().encode

IntArray = npt.NDArray[np.intp]
BoolArray = npt.NDArray[np.bool_]
U64Array = npt.NDArray[np.uint64]


class LookupTable:
    """lookup hash → mxid for one source of associations.

    A dict while it holds up to `arrays_from` hashes: nothing answers faster while it
    fits the CPU caches.  Past that the map moves into `HashArrays`, a third of the
    memory and faster for big batches, and the dict is dropped.
    """

    def __init__(self, arrays_from: int | None = None) -> None:
        self._mxids: dict[str, str] | None = {}
        self._arrays_from = ARRAYS_FROM if arrays_from is None else arrays_from
        self._arrays: HashArrays | None = None
        if self._arrays_from <= 0:
            self._move_to_arrays()

    def __len__(self) -> int:
        if self._mxids is not None:
            return len(self._mxids)
        assert self._arrays is not None
        return len(self._arrays)

    def reserve(self, count: int) -> None:
        """Make room for `count` more hashes at once (a start-up load knows its count)."""
        if self._mxids is not None and len(self._mxids) + count > self._arrays_from:
            self._move_to_arrays(count)
        if self._arrays is not None:
            self._arrays.reserve(count)

    def get(self, lookup_hash: str) -> str | None:
        if self._mxids is not None:
            return self._mxids.get(lookup_hash)
        assert self._arrays is not None
        return self._arrays.get(lookup_hash)

    def set(self, lookup_hash: str, mxid: str | None) -> None:
        """Bind `lookup_hash` to `mxid`, or unbind it when `mxid` is None.  A string that
        is not a lookup hash could never be asked for, so it is not kept."""
        if self._mxids is None:
            assert self._arrays is not None
            self._arrays.set(lookup_hash, mxid)
        elif key_of(lookup_hash) is not None:
            _remember(self._mxids, lookup_hash, mxid)
            self._move_when_big()

    def update(self, entries: Iterable[tuple[str, str | None]]) -> None:
        """`set` for many entries (the last entry of a hash wins)."""
        if self._mxids is None:
            assert self._arrays is not None
            self._arrays.update(entries)
            return
        for lookup_hash, mxid in entries:
            if key_of(lookup_hash) is not None:
                _remember(self._mxids, lookup_hash, mxid)
        self._move_when_big()

    def update_packed(self, hashes: str, mxids: str, count: int) -> bool:
        """`update` with `count` bindings packed in two strings: their lookup hashes one
        after another and their mxids joined by newlines (no two of one hash).  False,
        having changed nothing, if they cannot be unpacked so: a hash that is not 43
        ASCII characters, or an mxid holding a newline."""
        if not _unpackable(hashes, mxids, count):
            return False
        if self._mxids is None:
            assert self._arrays is not None
            return self._arrays.update_packed(hashes, mxids, count)
        self.update(zip((hashes[i:i + HASH_LENGTH]
                         for i in range(0, len(hashes), HASH_LENGTH)),
                        mxids.split("\n") if count else [], strict=True))
        return True

    def find(self, hashes: Sequence[str]) -> dict[str, str]:
        """The mxid of each of `hashes` that is bound."""
        if self._mxids is None:
            assert self._arrays is not None
            return self._arrays.find(hashes)
        get = self._mxids.get
        return {h: mxid for h in hashes if (mxid := get(h)) is not None}

    def find_json(self, hashes: Sequence[str]) -> tuple[bytes, int]:
        """`find`'s answer as a JSON object (UTF-8), and how many hashes it maps."""
        if self._arrays is not None:
            return self._arrays.find_json(hashes)
        return _as_json(self.find(hashes))

    def _move_when_big(self) -> None:
        if self._mxids is not None and len(self._mxids) > self._arrays_from:
            self._move_to_arrays()

    def _move_to_arrays(self, more: int = 0) -> None:
        arrays = HashArrays()
        items = list((self._mxids or {}).items())
        arrays.reserve(len(items) + more)
        for start in range(0, len(items), 50_000):
            arrays.update(items[start:start + 50_000])
        self._arrays, self._mxids = arrays, None


def _remember(mxids: dict[str, str], lookup_hash: str, mxid: str | None) -> None:
    if mxid is None:
        mxids.pop(lookup_hash, None)
    else:
        mxids[lookup_hash] = mxid


COMPILED = _probe is not None
# What an installation without the compiled probe tells its operator (at start, and in
# `kith status`).
UNCOMPILED = ("kith._probe is not built (kith was installed without a C compiler): "
              f"indexes past {ARRAYS_FROM} addresses are answered by numpy, several times "
              "slower")


class HashArrays:
    """lookup hash → mxid in flat arrays; `compiled`: whether `find` uses the compiled
    probe (the default where it was built) or numpy."""

    def __init__(self, compiled: bool = COMPILED) -> None:
        if compiled and _probe is None:
            raise RuntimeError("kith._probe is not built")
        self._compiled = compiled
        # Random odd multipliers: where a hash lands cannot be predicted from outside.
        self._k1 = secrets.randbits(64) | 1
        self._k2 = secrets.randbits(64) | 1
        self._np_k1, self._np_k2 = np.uint64(self._k1), np.uint64(self._k2)
        self._live = 0
        self._rows = 0
        self._keys = np.zeros((_MIN_ROWS, _WORDS), "<u8")
        # Where row r's mxid is: its start in _text << _REF_SHIFT | its length in bytes;
        # 0: unbound
        self._refs = np.zeros(_MIN_ROWS, np.int64)
        self._text = np.zeros(1024 + _WINDOW, np.uint8)
        self._text_used = 0
        self._text_dead = 0  # bytes of mxids no row points at any more
        # Rows whose mxid a window cannot give back: longer than one, or ending in NUL.
        self._unwindowed: set[int] = set()
        self._views()
        self._resize_table(_MIN_BUCKETS)

    def __len__(self) -> int:
        return self._live

    def reserve(self, rows: int) -> None:
        """Make room for `rows` more hashes at once (a start-up load knows its count)."""
        self._reserve(rows + rows // 50, exact=True)
        self._grow_table(self._rows + rows)

    # --- one address ------------------------------------------------------------------

    def get(self, lookup_hash: str) -> str | None:
        key = key_of(lookup_hash)
        if key is None:
            return None
        row = self._locate(key)
        return None if row is None else self._mxid_of(row)

    def set(self, lookup_hash: str, mxid: str | None) -> None:
        """Bind `lookup_hash` to `mxid`, or unbind it when `mxid` is None.  A string that
        is not a lookup hash could never be asked for, so it is not kept."""
        key = key_of(lookup_hash)
        if key is None:
            return
        row = self._locate(key)
        if row is None:
            if mxid is None:
                return
            row = self._append_row(key)
        self._write_mxids(np.array([row], np.intp), [mxid])

    # --- many addresses ---------------------------------------------------------------

    def find(self, hashes: Sequence[str]) -> dict[str, str]:
        """The mxid of each of `hashes` that is bound."""
        if self._compiled:
            return _probe.find(hashes, self._table, self._keys, self._refs, self._text,
                               self._k1, self._k2, self._shift)
        if len(hashes) < ARRAY_BATCH_MIN:
            return {h: mxid for h in hashes if (mxid := self.get(h)) is not None}
        keys, valid = _keys(hashes)
        rows = self._rows_of(keys, valid)
        positions = (rows >= 0).nonzero()[0]
        rows = rows.take(positions)
        refs = self._refs.take(rows)
        if np.count_nonzero(refs) < len(refs):  # some rows are unbound
            bound = refs != 0
            positions, rows, refs = positions[bound], rows[bound], refs[bound]
        if not len(rows):
            return {}
        windows = self._windows[refs >> _REF_SHIFT]
        window_bytes = windows.view(np.uint8).reshape(-1, _WINDOW)
        window_bytes &= _CUTS.take(np.minimum(refs & _REF_LENGTH, _WINDOW), axis=0)
        # numpy drops the padding NULs at the end of each window; an mxid longer than a
        # window, or one that ends in NUL itself (no valid Matrix ID does), is read alone.
        mxids = list(map(bytes.decode, windows.tolist()))
        if self._unwindowed:
            for i, row in enumerate(rows.tolist()):
                if row in self._unwindowed:
                    mxids[i] = self._mxid_of(row) or ""
        if len(mxids) == 1:
            return {hashes[int(positions[0])]: mxids[0]}
        return dict(zip(itemgetter(*positions.tolist())(hashes), mxids, strict=True))

    def find_json(self, hashes: Sequence[str]) -> tuple[bytes, int]:
        """`find`'s answer as a JSON object (UTF-8), and how many hashes it maps: the
        compiled probe writes it straight from the arrays, with no str made for each
        mxid found nor a dict to hold them."""
        if self._compiled:
            return _probe.find_json(hashes, self._table, self._keys, self._refs, self._text,
                                    self._k1, self._k2, self._shift)
        return _as_json(self.find(hashes))

    def update(self, entries: Iterable[tuple[str, str | None]]) -> None:
        """`set` for many entries at once (the last entry of a hash wins).  The entries
        are hashes kith made; of a big batch only the length is checked."""
        latest = dict(entries)
        if len(latest) < _VECTOR_MIN:
            for lookup_hash, mxid in latest.items():
                self.set(lookup_hash, mxid)
            return
        hashes = list(latest)
        mxids = list(latest.values())
        keys, valid = _keys(hashes)
        rows = self._rows_of(keys, valid)
        new = np.flatnonzero(rows < 0 if valid is None else (rows < 0) & valid)
        if None in mxids:  # an unbind of an unknown hash adds no row
            new = new[[mxids[i] is not None for i in new.tolist()]]
        if len(new):
            rows[new] = self._append_rows(keys.take(new, axis=0))
        known = np.flatnonzero(rows >= 0)
        if len(known) < len(mxids):
            mxids = [mxids[i] for i in known.tolist()]
        self._write_mxids(rows.take(known), mxids)

    def update_packed(self, hashes: str, mxids: str, count: int) -> bool:
        """`LookupTable.update_packed` (its caller has checked the strings' shape); False,
        having changed nothing, if a hash is there twice."""
        if not count:
            return True
        keys8 = np.empty((count, _KEY), np.uint8)
        keys8[:, :HASH_LENGTH] = np.frombuffer(hashes.encode("ascii"), np.uint8).reshape(
            count, HASH_LENGTH)
        keys8[:, HASH_LENGTH:] = np.frombuffer(_PAD, np.uint8)
        keys = keys8.view("<u8")
        mixed = np.sort(self._mix(keys[:, 0], keys[:, 1]))
        if np.count_nonzero(mixed[1:] == mixed[:-1]):  # (or two that mix alike: as rare)
            return False
        rows = self._rows_of(keys, None)
        new = np.flatnonzero(rows < 0)
        if len(new):
            rows[new] = self._append_rows(keys.take(new, axis=0))
        text = np.frombuffer(mxids.encode(), np.uint8)
        newlines = np.flatnonzero(text == _NEWLINE)
        lengths = np.diff(newlines, prepend=-1, append=len(text)) - 1
        self._write_text(rows, text.take(np.flatnonzero(text != _NEWLINE)), lengths)
        return True

    def _rows_of(self, asked: U64Array, valid: BoolArray | None) -> IntArray:
        """The row of each key in `asked` where `valid` (None: all are), or -1.

        Written for few and cheap array operations (`nonzero` rather than `flatnonzero`,
        `count_nonzero` rather than `any`): each costs about a microsecond whatever its
        size, which is most of the cost of a batch of a hundred."""
        mixed = self._mix(asked[:, 0], asked[:, 1])
        # (the shifted hash is below 2**63: its bits read as int64 are the same number)
        slots = self._table.take((mixed >> self._np_shift).view(np.int64), axis=0)
        # The high half of each little-endian slot is its fingerprint, the low half of
        # the hash with its lowest bit set.
        fingerprints = mixed.view(np.uint32)[::2] | np.uint32(1)
        # (the slots' high halves copied together first: comparing them in place, with
        # a stride, is slower than copying and comparing)
        high = slots.view(np.uint32)[:, 1::2].copy()
        matches = (high == fingerprints[:, None]).ravel().nonzero()[0]
        rows = np.empty(len(asked), np.intp)
        rows.fill(-1)
        rows[matches // _BUCKET] = slots.reshape(-1).take(matches) & _LOW32
        if valid is not None:
            rows[~valid] = -1
        # Rare, so one by one: a fingerprint that matched another key, and a key
        # not found in a full bucket (it may have overflowed into the next one).
        found = (rows >= 0).nonzero()[0]
        differ = (self._keys.take(rows.take(found), axis=0) != asked.take(found, axis=0))
        again = found[differ.any(axis=1)].tolist() if np.count_nonzero(differ) else []
        full = slots[:, -1] != 0
        if np.count_nonzero(full):
            missed = (rows < 0) & full
            again += (missed if valid is None else missed & valid).nonzero()[0].tolist()
        for p in again:
            row = self._locate(asked[p].tobytes())
            rows[p] = -1 if row is None else row
        return rows

    # --- layout -----------------------------------------------------------------------

    def _mix(self, w0: U64Array, w1: U64Array) -> U64Array:
        # (uint64 arithmetic on arrays wraps around silently; in place: fewer arrays made)
        mixed = w0 * self._np_k1
        mixed ^= w1
        mixed *= self._np_k2
        return mixed

    def _mix_one(self, key: bytes) -> int:
        w0: int
        w1: int
        w0, w1 = _HEAD.unpack_from(key)
        return (((w0 * self._k1) & _M64) ^ w1) * self._k2 & _M64

    def _locate(self, key: bytes) -> int | None:
        mixed = self._mix_one(key)
        fingerprint = (mixed & _M32) | 1
        bucket = mixed >> self._shift
        slots, keys = self._table_view, self._key_view
        while True:
            base = bucket * _BUCKET
            for i in range(base, base + _BUCKET):
                slot = slots[i]
                if slot == 0:
                    return None
                if slot >> 32 == fingerprint:
                    row = slot & _M32
                    if keys[row * _KEY:(row + 1) * _KEY] == key:
                        return row
            bucket = (bucket + 1) & (self._buckets - 1)

    def _append_row(self, key: bytes) -> int:
        row = self._rows
        self._reserve(1)
        self._key_view[row * _KEY:(row + 1) * _KEY] = key
        self._rows += 1
        if not self._grow_table(self._rows):
            mixed = self._mix_one(key)
            self._put(mixed >> self._shift, ((mixed & _M32) | 1) << 32 | row)
        return row

    def _append_rows(self, keys: U64Array) -> IntArray:
        first = self._rows
        self._reserve(len(keys))
        rows = np.arange(first, first + len(keys), dtype=np.intp)
        self._keys[rows] = keys
        self._rows += len(keys)
        if not self._grow_table(self._rows):
            self._place(rows)
        return rows

    def _write_mxids(self, rows: IntArray, mxids: list[str | None]) -> None:
        """Point `rows` at their new mxids (None: unbound), appended to the text."""
        if not len(rows):
            return
        if None in mxids:
            encoded = [b"" if m is None else m.encode() for m in mxids]
        else:
            encoded = list(map(str.encode, mxids))  # type: ignore[arg-type]
        lengths = np.fromiter(map(len, encoded), np.int64, len(encoded))
        self._write_text(rows, np.frombuffer(b"".join(encoded), np.uint8), lengths)

    def _write_text(self, rows: IntArray, joined: npt.NDArray[np.uint8],
                    lengths: npt.NDArray[np.int64]) -> None:
        """Point `rows` at the mxids `joined` holds one after another, `lengths` bytes
        each (0: unbound), appended to the text."""
        old = self._refs.take(rows) & _REF_LENGTH
        if len(lengths) and int(lengths.max()) > _REF_LENGTH:
            raise ValueError("an mxid longer than 16 MiB")
        self._text_dead += int(old.sum())
        self._refs[rows] = 0
        if self._text_used + len(joined) > len(self._text) - _WINDOW:
            self._compact_text(len(joined))
        start = self._text_used
        self._text[start:start + len(joined)] = joined
        self._text_used += len(joined)
        ends = start + np.cumsum(lengths)
        self._refs[rows] = np.where(lengths != 0, (ends - lengths) << _REF_SHIFT | lengths, 0)
        if self._unwindowed:
            self._unwindowed.difference_update(rows.tolist())
        last = self._text.take(ends - 1)  # (an empty mxid's is never read)
        unwindowed = (lengths > _WINDOW) | ((last == 0) & (lengths != 0))
        if unwindowed.any():
            self._unwindowed.update(rows[unwindowed].tolist())
        self._live += int(np.count_nonzero(lengths)) - int(np.count_nonzero(old))

    def _compact_text(self, more: int) -> None:
        """Make room for `more` bytes of mxids: drop the dead ones if they are many, grow
        the buffer if it is still too small."""
        live = self._text_used - self._text_dead
        compact = self._text_dead > live // 4
        size = len(self._text) - _WINDOW
        while size < (live if compact else self._text_used) + more:
            size = int(size * _GROWTH) + 1024
        size += _WINDOW
        old, self._text = self._text, np.zeros(size, np.uint8)
        if compact:
            # Copy only the live mxids, a slice of rows at a time (bounded temporaries).
            used = 0
            for first in range(0, self._rows, 1 << 16):
                rows = first + np.flatnonzero(self._refs[first:first + (1 << 16)])
                refs = self._refs.take(rows)
                lengths = refs & _REF_LENGTH
                ends = np.cumsum(lengths)
                within = np.arange(int(ends[-1]) if len(ends) else 0) - np.repeat(
                    ends - lengths, lengths)
                chunk = old[np.repeat(refs >> _REF_SHIFT, lengths) + within]
                self._text[used:used + len(chunk)] = chunk
                self._refs[rows] = (used + ends - lengths) << _REF_SHIFT | lengths
                used += len(chunk)
            self._text_used, self._text_dead = used, 0
        else:
            self._text[:self._text_used] = old[:self._text_used]
        self._views()

    def _reserve(self, count: int, *, exact: bool = False) -> None:
        needed = self._rows + count
        if needed <= len(self._keys):
            return
        size = needed if exact else max(needed, int(len(self._keys) * _GROWTH) + _MIN_ROWS)
        self._keys = _resized(self._keys, size)
        self._refs = _resized(self._refs, size)
        self._views()

    def _grow_table(self, rows: int) -> bool:
        """Double the table (placing every row again) until `rows` fit; True if it did."""
        buckets = self._buckets
        while rows > buckets * _BUCKET * _MAX_LOAD:
            buckets *= 2
        if buckets == self._buckets:
            return False
        self._resize_table(buckets)
        return True

    def _resize_table(self, buckets: int) -> None:
        self._buckets = buckets
        self._shift = 64 - (buckets.bit_length() - 1)
        self._np_shift = np.uint64(self._shift)
        self._table = np.zeros((buckets, _BUCKET), np.uint64)
        self._table_view = _flat_view(self._table.reshape(-1))
        if self._rows:
            for start in range(0, self._rows, 1 << 20):  # bounded temporaries
                self._place(np.arange(start, min(self._rows, start + (1 << 20)),
                                      dtype=np.intp))

    def _place(self, rows: IntArray) -> None:
        """Put `rows` into the table: all at once where the home bucket has room, the
        rest one by one into the next bucket with room."""
        keys = self._keys.take(rows, axis=0)
        mixed = self._mix(keys[:, 0], keys[:, 1])
        packed = ((mixed & _LOW32) | _ONE) << _THIRTY_TWO | rows.astype(np.uint64)
        buckets = (mixed >> self._np_shift).astype(np.intp)
        order = np.argsort(buckets, kind="stable")
        buckets, packed = buckets[order], packed[order]
        rank = np.arange(len(buckets)) - np.searchsorted(buckets, buckets, side="left")
        target = np.count_nonzero(self._table[buckets] != 0, axis=1) + rank
        fits = target < _BUCKET
        self._table[buckets[fits], target[fits]] = packed[fits]
        for bucket, slot in zip(buckets[~fits].tolist(), packed[~fits].tolist(), strict=True):
            self._put(bucket, slot)

    def _put(self, bucket: int, slot: int) -> None:
        """Into the first free slot from `bucket` on (a full bucket overflows onward)."""
        table = self._table_view
        while table[bucket * _BUCKET + _BUCKET - 1] != 0:
            bucket = (bucket + 1) & (self._buckets - 1)
        base = bucket * _BUCKET
        table[next(i for i in range(base, base + _BUCKET) if table[i] == 0)] = slot

    def _mxid_of(self, row: int) -> str | None:
        ref = int(self._refs[row])
        if not ref:
            return None
        start, length = ref >> _REF_SHIFT, ref & _REF_LENGTH
        return str(self._text_view[start:start + length], "utf-8")

    def _views(self) -> None:
        self._key_view = _flat_view(self._keys.reshape(-1).view(np.uint8))
        self._text_view = _flat_view(self._text)
        # Every `_WINDOW` bytes of the text, as one string each (overlapping): a window
        # is then copied whole rather than byte by byte.
        self._windows = np.ndarray((len(self._text) - _WINDOW + 1,), f"S{_WINDOW}",
                                   buffer=self._text, strides=(1,))


def _as_json(found: dict[str, str]) -> tuple[bytes, int]:
    return _encode(found), len(found)


def key_of(lookup_hash: str) -> bytes | None:
    """The key of a lookup hash, or None for a string no sha256 key encodes to."""
    if _HASH.fullmatch(lookup_hash) is None:
        return None
    return lookup_hash.encode("ascii") + _PAD


def _keys(hashes: Sequence[str]) -> tuple[U64Array, BoolArray | None]:
    """The key of each hash as six little-endian words, and which hashes can be lookup
    hashes (None: all can; the key of another string is meaningless).  A batch of
    43-character ASCII strings is taken as it is: a string outside the alphabet matches
    no stored key."""
    n = len(hashes)
    pad = _PAD.decode()
    try:
        raw = (pad.join(hashes) + pad).encode("ascii")
    except UnicodeEncodeError:
        return _keys_one_by_one(hashes)
    # A hash never holds a newline, so with exactly one newline per hash, each where a
    # key's pad starts, every hash has the right length.
    if len(raw) != _KEY * n or raw[HASH_LENGTH::_KEY] != b"\n" * n:
        return _keys_one_by_one(hashes)
    # (numpy counts bytes several times faster than bytes.count)
    if np.count_nonzero(np.frombuffer(raw, np.uint8) == _NEWLINE) != n:
        return _keys_one_by_one(hashes)
    return np.frombuffer(raw, "<u8").reshape(n, _WORDS), None


def _unpackable(hashes: str, mxids: str, count: int) -> bool:
    """Whether `count` packed hashes and mxids (`update_packed`) can be told apart."""
    if not count:
        return not hashes and not mxids
    return (len(hashes) == HASH_LENGTH * count and hashes.isascii()
            and mxids.count("\n") == count - 1)


def _keys_one_by_one(hashes: Sequence[str]) -> tuple[U64Array, BoolArray | None]:
    keys = [key_of(h) for h in hashes]
    valid = np.array([k is not None for k in keys], bool)
    joined = b"".join(k or bytes(_KEY) for k in keys)
    return np.frombuffer(joined, "<u8").reshape(-1, _WORDS), valid


def _flat_view(array: npt.NDArray[np.generic]) -> memoryview:
    """A memoryview of a 1-d array: element access without the cost of a numpy call."""
    return memoryview(array.data)


_Array = TypeVar("_Array", bound=npt.NDArray[Any])


def _resized(array: _Array, size: int) -> _Array:
    bigger = np.zeros((size, *array.shape[1:]), array.dtype)
    bigger[:len(array)] = array
    return cast(_Array, bigger)
