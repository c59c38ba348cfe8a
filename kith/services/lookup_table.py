"""lookup hash → mxid: a dict, and for big maps also flat arrays for big batches.

A Python dict answers one probe at a time, and with a million bindings nearly every probe
misses the CPU caches several times over (the table, the entry, the key object, the
value object).  `HashArrays` keeps the map in a few flat arrays: a bucketed hash table
of packed (fingerprint, row) slots, and the lookup hashes and mxids by row.  A batch of
addresses becomes a handful of array operations whose memory accesses overlap, so a
1000-address lookup costs nearly the same with 2k or 1M bindings; but those operations
cost a fixed ~30 µs, so small batches stay with the dict (docs/decisions.md).

Lookup hashes are 43 characters of unpadded URL-safe base64 (sha256); anything else can
never match.  Rows are never freed: unbinding empties a row's mxid and binding the same
hash again fills it, so the arrays grow only with distinct hashes.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Iterable, Sequence

import numpy as np
import numpy.typing as npt

HASH_LENGTH = 43
# A record is a hash and a pad that starts with a newline, 48 bytes: six aligned
# little-endian words, so that whole hashes compare in six vector operations (w0 and w1
# also feed the hash function).
_PAD = b"\n    "
_RECORD = HASH_LENGTH + len(_PAD)
_WORDS = _RECORD // 8
_HEAD = struct.Struct("<QQ")
_BUCKET = 8        # slots per bucket: one 64-byte cache line of uint64
_MAX_LOAD = 0.375  # rows per slot before the table doubles
_MIN_BUCKETS = 16
_MIN_ROWS = 64
# Up to this many hashes a dict answers every batch size fastest; past it, batches of
# ARRAY_BATCH_MIN addresses or more go to the arrays (docs/decisions.md).
ARRAYS_FROM = 100_000
ARRAY_BATCH_MIN = 256
# Below this many entries an update is cheaper one by one than in array operations.
_VECTOR_MIN = 16
_M64 = (1 << 64) - 1
_M32 = (1 << 32) - 1
_LOW32, _ONE, _THIRTY_TWO = np.uint64(_M32), np.uint64(1), np.uint64(32)

IntArray = npt.NDArray[np.intp]
U64Array = npt.NDArray[np.uint64]


class LookupTable:
    """lookup hash → mxid for one source of associations.

    Always a dict: while it fits the CPU caches nothing answers faster, and it answers
    small batches fastest at any size.  Past `arrays_from` hashes the same map is also
    kept in `HashArrays`, which answer big batches (`ARRAY_BATCH_MIN` addresses or more)
    without paying the dict's cache misses one address at a time.
    """

    def __init__(self, arrays_from: int = ARRAYS_FROM) -> None:
        self._mxids: dict[str, str] = {}
        self._arrays_from = arrays_from
        self._arrays: HashArrays | None = HashArrays() if arrays_from <= 0 else None

    def __len__(self) -> int:
        return len(self._mxids)

    def get(self, lookup_hash: str) -> str | None:
        return self._mxids.get(lookup_hash)

    def set(self, lookup_hash: str, mxid: str | None) -> None:
        """Bind `lookup_hash` to `mxid`, or unbind it when `mxid` is None.  A string that
        is not a lookup hash could never be asked for, so it is not kept."""
        if _key_bytes(lookup_hash) is None:
            return
        self._remember(lookup_hash, mxid)
        if self._arrays is not None:
            self._arrays.set(lookup_hash, mxid)
        else:
            self._start_arrays_when_big()

    def update(self, entries: Iterable[tuple[str, str | None]]) -> None:
        """`set` for many entries (the last entry of a hash wins)."""
        latest = {h: mxid for h, mxid in entries if _key_bytes(h) is not None}
        for lookup_hash, mxid in latest.items():
            self._remember(lookup_hash, mxid)
        if self._arrays is not None:
            self._arrays.update(latest.items())
        else:
            self._start_arrays_when_big()

    def _remember(self, lookup_hash: str, mxid: str | None) -> None:
        if mxid is None:
            self._mxids.pop(lookup_hash, None)
        else:
            self._mxids[lookup_hash] = mxid

    def find(self, hashes: Sequence[str]) -> dict[str, str]:
        """The mxid of each of `hashes` that is bound."""
        if self._arrays is not None and len(hashes) >= ARRAY_BATCH_MIN:
            return self._arrays.find(hashes)
        get = self._mxids.get
        return {h: mxid for h in hashes if (mxid := get(h)) is not None}

    def _start_arrays_when_big(self) -> None:
        if len(self._mxids) <= self._arrays_from:
            return
        self._arrays = HashArrays()
        items = list(self._mxids.items())
        for start in range(0, len(items), 50_000):
            self._arrays.update(items[start:start + 50_000])


class HashArrays:
    """lookup hash → mxid in flat arrays, for answering big batches."""

    def __init__(self) -> None:
        # Random odd multipliers: where a hash lands cannot be predicted from outside.
        self._k1 = secrets.randbits(64) | 1
        self._k2 = secrets.randbits(64) | 1
        self._np_k1, self._np_k2 = np.uint64(self._k1), np.uint64(self._k2)
        self._live = 0
        self._rows = 0
        self._hashes = np.zeros((_MIN_ROWS, _WORDS), "<u8")
        self._mxids = np.zeros(_MIN_ROWS, "S32")
        self._views()
        self._resize_table(_MIN_BUCKETS)

    def __len__(self) -> int:
        return self._live

    # --- one address ------------------------------------------------------------------

    def get(self, lookup_hash: str) -> str | None:
        key = _key_bytes(lookup_hash)
        if key is None:
            return None
        row = self._locate(key)
        return None if row is None else self._mxid_of(row)

    def set(self, lookup_hash: str, mxid: str | None) -> None:
        """Bind `lookup_hash` to `mxid`, or unbind it when `mxid` is None.  A string that
        is not a lookup hash could never be asked for, so it is not kept."""
        key = _key_bytes(lookup_hash)
        if key is None:
            return
        row = self._locate(key)
        if row is None:
            if mxid is None:
                return
            row = self._append_row(key)
        was_live = self._mxid_of(row) is not None
        encoded = b"" if mxid is None else mxid.encode()
        if len(encoded) > self._width:
            self._widen(len(encoded))
        self._mxids[row] = encoded
        self._live += (mxid is not None) - was_live

    # --- many addresses ---------------------------------------------------------------

    def find(self, hashes: Sequence[str]) -> dict[str, str]:
        """The mxid of each of `hashes` that is bound."""
        raw = _records(hashes)
        if raw is None:
            hashes = [h for h in hashes if _key_bytes(h) is not None]
            if not hashes:
                return {}
            raw = _records(hashes)
            assert raw is not None
        rows = self._rows_of(hashes, raw)
        positions = np.flatnonzero(rows >= 0)
        mxids = self._mxids.take(rows.take(positions))
        bound = mxids != b""
        if not bound.all():
            positions, mxids = positions[bound], mxids[bound]
        return dict(zip(map(hashes.__getitem__, positions.tolist()),
                        map(bytes.decode, mxids.tolist()), strict=True))

    def update(self, entries: Iterable[tuple[str, str | None]]) -> None:
        """`set` for many entries at once (the last entry of a hash wins)."""
        latest = {h: mxid for h, mxid in entries if _key_bytes(h) is not None}
        hashes = list(latest)
        if len(hashes) < _VECTOR_MIN:
            for lookup_hash, mxid in latest.items():
                self.set(lookup_hash, mxid)
            return
        raw = _records(hashes)
        assert raw is not None  # every hash is well-formed
        rows = self._rows_of(hashes, raw)
        mxids = list(latest.values())
        new = np.flatnonzero(rows < 0)
        new = new[[mxids[i] is not None for i in new.tolist()]]
        if len(new):
            rows[new] = self._append_rows(_words(raw).take(new, axis=0))
        known = np.flatnonzero(rows >= 0)
        rows = rows[known]
        encoded = [b"" if mxids[i] is None else mxids[i].encode()  # type: ignore[union-attr]
                   for i in known.tolist()]
        width = max(map(len, encoded), default=0)
        if width > self._width:
            self._widen(width)
        before = int(np.count_nonzero(self._mxids[rows] != b""))
        self._mxids[rows] = encoded
        self._live += int(np.count_nonzero(self._mxids[rows] != b"")) - before

    def _rows_of(self, hashes: Sequence[str], raw: bytes) -> IntArray:
        """The row of each hash (well-formed, as records in `raw`), or -1."""
        asked = _words(raw)
        mixed = self._mix(asked[:, 0], asked[:, 1])
        slots = self._table.take((mixed >> self._np_shift).astype(np.intp), axis=0)
        fingerprints = ((mixed & _LOW32) | _ONE).astype(np.uint32)
        # The high half of each little-endian slot is its fingerprint.
        matches = np.flatnonzero(slots.view(np.uint32)[:, 1::2] == fingerprints[:, None])
        rows = np.full(len(asked), -1, np.intp)
        rows[matches // _BUCKET] = slots.reshape(-1).take(matches) & _LOW32
        # Rare, so one by one: a fingerprint that matched another hash, and a hash not
        # found in a full bucket (it may have overflowed into the next one).
        found = np.flatnonzero(rows >= 0)
        stored, given = self._hashes.take(rows.take(found), axis=0), asked.take(found, axis=0)
        differ = stored[:, 0] ^ given[:, 0]
        for word in range(1, _WORDS):
            differ |= stored[:, word] ^ given[:, word]
        again = found[differ != 0]
        overflowed = np.flatnonzero((rows < 0) & (slots[:, -1] != 0))
        for p in [*again.tolist(), *overflowed.tolist()]:
            row = self._locate(raw[p * _RECORD:p * _RECORD + HASH_LENGTH])
            rows[p] = -1 if row is None else row
        return rows

    # --- layout -----------------------------------------------------------------------

    def _mix(self, w0: U64Array, w1: U64Array) -> U64Array:
        # (uint64 arithmetic on arrays wraps around silently)
        return ((w0 * self._np_k1) ^ w1) * self._np_k2

    def _mix_one(self, key: bytes) -> int:
        w0: int
        w1: int
        w0, w1 = _HEAD.unpack_from(key)
        return (((w0 * self._k1) & _M64) ^ w1) * self._k2 & _M64

    def _locate(self, key: bytes) -> int | None:
        mixed = self._mix_one(key)
        fingerprint = (mixed & _M32) | 1
        bucket = mixed >> self._shift
        slots, hashes = self._table_view, self._hash_view
        while True:
            base = bucket * _BUCKET
            for i in range(base, base + _BUCKET):
                slot = slots[i]
                if slot == 0:
                    return None
                if slot >> 32 == fingerprint:
                    row = slot & _M32
                    if hashes[row * _RECORD:row * _RECORD + HASH_LENGTH] == key:
                        return row
            bucket = (bucket + 1) & (self._buckets - 1)

    def _append_row(self, key: bytes) -> int:
        row = self._rows
        self._reserve(1)
        self._hash_view[row * _RECORD:(row + 1) * _RECORD] = key + _PAD
        self._rows += 1
        if not self._grow_table():
            mixed = self._mix_one(key)
            self._put(mixed >> self._shift, ((mixed & _M32) | 1) << 32 | row)
        return row

    def _append_rows(self, records: U64Array) -> IntArray:
        first = self._rows
        self._reserve(len(records))
        rows = np.arange(first, first + len(records), dtype=np.intp)
        self._hashes[rows] = records
        self._rows += len(records)
        if not self._grow_table():
            self._place(rows)
        return rows

    def _reserve(self, count: int) -> None:
        while self._rows + count > len(self._hashes):
            self._hashes = _grown(self._hashes)
            self._mxids = _grown(self._mxids)
            self._views()

    def _grow_table(self) -> bool:
        """Double the table (placing every row again) if it is too full; True if it did."""
        buckets = self._buckets
        while self._rows > buckets * _BUCKET * _MAX_LOAD:
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
            self._place(np.arange(self._rows, dtype=np.intp))

    def _place(self, rows: IntArray) -> None:
        """Put `rows` into the table: all at once where the home bucket has room, the
        rest one by one into the next bucket with room."""
        records = self._hashes.take(rows, axis=0)
        mixed = self._mix(records[:, 0], records[:, 1])
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
        width = self._width
        value = bytes(self._mxid_view[row * width:(row + 1) * width]).rstrip(b"\0")
        return value.decode() if value else None

    def _widen(self, width: int) -> None:
        self._mxids = self._mxids.astype(f"S{width + 16}")
        self._views()

    def _views(self) -> None:
        self._width = self._mxids.dtype.itemsize
        self._hash_view = _flat_view(self._hashes.reshape(-1).view(np.uint8))
        self._mxid_view = _flat_view(self._mxids.view(np.uint8))


def _key_bytes(lookup_hash: str) -> bytes | None:
    """The hash as bytes, or None for what cannot be one (so that `_records` accepts
    any list of strings this accepts)."""
    if len(lookup_hash) != HASH_LENGTH or not lookup_hash.isascii() or "\n" in lookup_hash:
        return None
    return lookup_hash.encode("ascii")


def _records(hashes: Sequence[str]) -> bytes | None:
    """The hashes as records, or None unless every one is 43 ASCII characters.  A hash
    never holds a newline, so with exactly one newline per hash, each where a record's
    pad starts, every hash has the right length."""
    pad = _PAD.decode()
    try:
        raw = (pad.join(hashes) + pad).encode("ascii")
    except UnicodeEncodeError:
        return None
    n = len(hashes)
    if len(raw) != _RECORD * n or raw[HASH_LENGTH::_RECORD] != b"\n" * n:
        return None
    if np.count_nonzero(np.frombuffer(raw, np.uint8) == _PAD[0]) != n:
        return None
    return raw


def _words(raw: bytes) -> U64Array:
    return np.frombuffer(raw, "<u8").reshape(-1, _WORDS)


def _flat_view(array: npt.NDArray[np.generic]) -> memoryview:
    """A memoryview of a 1-d array: element access without the cost of a numpy call."""
    return memoryview(array.data)


def _grown(array: npt.NDArray[np.generic]) -> npt.NDArray[np.generic]:
    bigger = np.zeros((len(array) * 2, *array.shape[1:]), array.dtype)
    bigger[:len(array)] = array
    return bigger
