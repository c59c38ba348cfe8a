"""[proxy] adopt_pepper: kith's lookup pepper is the upstream identity server's.

A client hashes the addresses it looks up with the pepper kith announces; a hash cannot
be turned back into an address.  So when kith announces the upstream's pepper, a hash
that no local source maps can be forwarded to the upstream just as the client made it.

kith reads the upstream's hash_details at start, every `poll_s`, and whenever the
upstream answers a forwarded lookup M_INVALID_PEPPER.  When the upstream's pepper is not
kith's, kith changes its own to it by a rotation (kith.services.pepper), so the local
lookup hashes follow with no wrong answer, exactly as in a rotation of kith's own.  If
the upstream offers no sha256 or does not answer, kith keeps the pepper it has, forwards
no hash, says so in one log line, and looks again at the next poll
(docs/decisions.md, "Adopting the upstream's lookup pepper").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from kith.services.pepper import LookupPeppers, PepperRotation, RotationBusy, read_record
from kith.sources.upstream import UpstreamError, UpstreamIdentityServer
from kith.store import Store

log = logging.getLogger(__name__)

# A lookup that finds the upstream's pepper changed waits at most this long for kith to
# announce it, so that the client's retry (which reads hash_details again) uses it.
ANNOUNCE_WAIT_S = 10.0
# How long a read of the upstream's hash_details is taken as current: lookups made with
# another pepper than the upstream's ask again at most this often.
FRESH_S = 1.0
# At start, how long to wait for another process that is changing the pepper.
START_LOCK_WAIT_S = 120.0


class AdoptedPepper:
    """Which pepper the upstream's is, and kith's pepper made the same."""

    def __init__(self, store: Store, peppers: LookupPeppers,
                 upstream: UpstreamIdentityServer,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._peppers = peppers
        self._upstream = upstream
        self._clock = clock
        # The upstream's pepper once the store names it (as current or next pepper):
        # hashes made with it are forwarded.  None: nothing is forwarded.
        self.pepper: str | None = None
        self._read_at = -FRESH_S
        self._reading: asyncio.Task[None] | None = None
        self._completing: asyncio.Task[None] | None = None
        self._said = ""

    async def start(self) -> None:
        """Before the index is loaded: adopt the upstream's pepper, the stored hashes
        rewritten before kith serves (once: after that the store has it)."""
        await self._read(inline=True)

    async def check(self) -> int:
        """Now and then: follow the upstream's pepper; 1 if kith starts changing to it."""
        before = self.pepper
        await self._read_once()
        return int(self.pepper is not None and self.pepper != before)

    async def pepper_for(self, pepper: str) -> str | None:
        """The upstream's pepper, for a sha256 lookup made with `pepper` (forward if
        they are the same; else the client is to ask again with the one returned, which
        the store names), or None: forward nothing."""
        if self.pepper is not None and pepper != self.pepper and (
                self._clock() - self._read_at >= FRESH_S):
            await self._read_once()
        if self.pepper is not None and pepper != self.pepper:
            await self._announced()
        return self.pepper

    async def rejected(self, pepper: str) -> str | None:
        """The upstream refused `pepper`: its pepper now (kith changing to it), or None
        if it still says `pepper` or cannot be read (forward nothing this time)."""
        if self.pepper == pepper:
            await self._read_once()
        if self.pepper is None or self.pepper == pepper:
            return None
        await self._announced()
        return self.pepper

    async def close(self) -> None:
        for task in (self._reading, self._completing):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    async def _read_once(self) -> None:
        """Read the upstream's hash_details, once for all who ask meanwhile."""
        if self._reading is None or self._reading.done():
            self._reading = asyncio.create_task(self._read(inline=False),
                                                name="kith-upstream-pepper")
        await asyncio.shield(self._reading)

    async def _read(self, inline: bool) -> None:
        self._read_at = self._clock()
        try:
            algorithms, pepper = await self._upstream.hash_details()
        except UpstreamError as exc:
            self._keep(f"its hash_details could not be read ({exc})")
            return
        if "sha256" not in algorithms:
            self._keep("it offers no sha256 lookups")
            return
        if pepper == self.pepper:
            return
        try:
            rotation = await PepperRotation.begin(
                self._store, pepper, wait_s=START_LOCK_WAIT_S if inline else 0)
        except RotationBusy:
            record = await read_record(self._store)
            if pepper not in (record.current, record.next):
                self._keep("another process is changing the lookup pepper")
                return
            rotation = None  # another process of this server is adopting it
        self.pepper = pepper
        self._said = ""
        log.info("[proxy] adopt_pepper: announcing the lookup pepper of %s",
                 self._upstream.config.identity)
        if rotation is None:
            if not inline:  # at start, the index is loaded next, with the store's pepper
                await self._peppers.sync()
        elif inline:
            await rotation.complete()
        else:
            self._completing = asyncio.create_task(self._complete(rotation),
                                                   name="kith-adopt-pepper")

    async def _complete(self, rotation: PepperRotation) -> None:
        try:
            await self._peppers.sync()  # index the new pepper meanwhile
            await rotation.complete()
            await self._peppers.sync()
            await self._peppers.accepts(rotation.pepper)  # announced once indexed
        except Exception:
            log.warning("[proxy] adopt_pepper: could not change the lookup pepper to the "
                        "upstream's; trying again at the next look", exc_info=True)
            self.pepper = None

    async def _announced(self) -> None:
        """Wait (a while) for the pepper change under way to be announced here."""
        if self._completing is not None and not self._completing.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._completing), ANNOUNCE_WAIT_S)

    def _keep(self, reason: str) -> None:
        """kith keeps its pepper (and, if adopted before, the upstream's as it was)."""
        if reason != self._said:
            self._said = reason
            log.warning("[proxy] adopt_pepper: %s: %s; kith keeps its lookup pepper and "
                        "forwards %s, and looks again later",
                        self._upstream.config.identity, reason,
                        "hashes made with it" if self.pepper else "no sha256 lookup")
