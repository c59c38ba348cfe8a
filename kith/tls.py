"""TLS for the client API: kith's certificate and key, reloadable without a restart.

Synapse calls an identity server only as `https://<id_server>`, so a small deployment can
serve TLS itself instead of running a reverse proxy.  The `SSLContext` is built once and
kept: on SIGHUP the certificate chain is loaded again into the same context, so the
listener stays up and new handshakes use the new certificate.  The new files are tried on
a scratch context in a thread first; the live context is then loaded on the event loop,
where the handshakes run, so none sees the new certificate with the old key.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass

from kith.config import ConfigError, HttpConfig

log = logging.getLogger(__name__)

_CERTFILE = "clientapi.https.certfile"


@dataclass
class ClientTls:
    """The client listener's server-side TLS context and the files it comes from."""

    certfile: str
    keyfile: str
    context: ssl.SSLContext

    @classmethod
    async def from_config(cls, http: HttpConfig) -> ClientTls | None:
        """None when TLS is off; ConfigError when the files are not a usable cert and key."""
        if not http.client_https_certfile:
            return None
        certfile, keyfile = http.client_https_certfile, http.client_https_keyfile
        # Reading and parsing PEM files blocks: keep it off the event loop.
        return await asyncio.to_thread(cls._build, certfile, keyfile)

    @classmethod
    def _build(cls, certfile: str, keyfile: str) -> ClientTls:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls = cls(certfile, keyfile, context)
        try:
            tls._load()
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"[http] {_CERTFILE}: {describe_problem(exc)}") from None
        return tls

    def _load(self) -> None:
        self.context.load_cert_chain(self.certfile, self.keyfile or None)

    def _check(self) -> None:
        # A half-failed load_cert_chain can leave the new certificate with the old key:
        # try the files on a scratch context first, so the live one changes only if they work.
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
            self.certfile, self.keyfile or None)

    async def reload(self) -> bool:
        """Load the files again; on failure keep serving the old certificate."""
        try:
            await asyncio.to_thread(self._check)
            # Between loading the chain and the key, a handshake would pair the new
            # certificate with the old key: load them where no handshake can run in
            # between.  The files were just read, so this costs the loop next to nothing.
            self._load()
        except (OSError, ssl.SSLError) as exc:
            log.error("TLS certificate not reloaded, keeping the old one: %s: %s",
                      self.certfile, describe_problem(exc))
            return False
        log.info("TLS certificate reloaded from %s", self.certfile)
        return True


def describe_problem(exc: OSError | ssl.SSLError) -> str:
    """Why a certificate and key (and CA) could not be loaded, in one line."""
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or str(exc)
        return f"not a usable PEM certificate and matching private key ({reason})"
    return f"cannot read {exc.filename or 'the file'}: {exc.strerror or exc}"
