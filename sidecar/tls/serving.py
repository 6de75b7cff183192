"""The serving certificate, swappable while serving.

The context handed to the server never changes; its SNI callback (which OpenSSL runs
for every ClientHello, with or without a server name) points each new connection at
the current certificate's context. A rotation therefore reaches new connections only:
connections already established keep the certificate they were handshaken with, and
nothing in flight is dropped.

``--cert-path`` is polled every ``--cert-reload-interval``; the files are compared by
content (Kubernetes swaps a Secret volume's files through a symlink). A pair that does
not load (a half-written update, a key that does not match) is ignored until the next
change, and the previous certificate stays in use.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
from collections.abc import Callable
from pathlib import Path

from common.tls import CERT_FILE, KEY_FILE, CertificatePair, self_signed

__all__ = ["ServingTLS", "host_address", "server_context"]

log = logging.getLogger("pd_sidecar.tls")


def _load_into(context: ssl.SSLContext, pair: CertificatePair) -> None:
    """``load_cert_chain`` wants paths: hand it anonymous in-memory files."""
    fds = []
    try:
        paths = []
        for data in (pair.cert_pem, pair.key_pem):
            fd = os.memfd_create("pd-sidecar-tls", os.MFD_CLOEXEC)
            fds.append(fd)
            os.write(fd, data)
            paths.append(f"/proc/self/fd/{fd}")
        context.load_cert_chain(paths[0], paths[1])
    finally:
        for fd in fds:
            os.close(fd)


def server_context(pair: CertificatePair) -> ssl.SSLContext:
    """A server context for ``pair``; ``ssl.SSLError`` when the pair does not load."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_into(context, pair)
    return context


def _read_dir(path: str) -> CertificatePair:
    directory = Path(path)
    return CertificatePair(
        (directory / CERT_FILE).read_bytes(), (directory / KEY_FILE).read_bytes()
    )


def host_address() -> str | None:
    """This host's address as its name resolves (the pod IP in Kubernetes), if any."""
    try:
        address = socket.gethostbyname(socket.gethostname())
    except OSError:
        return None
    return None if address.startswith("127.") else address


class ServingTLS:
    """The server-side SSL context and, for ``--cert-path``, its reload loop."""

    def __init__(
        self,
        pair: CertificatePair,
        *,
        cert_path: str = "",
        interval_s: float = 5.0,
        on_reload: Callable[[str], None] | None = None,
    ) -> None:
        self.cert_path = cert_path
        self.interval_s = interval_s
        self._pair = pair
        self._current = server_context(pair)
        self._on_reload = on_reload
        self._task: asyncio.Task[None] | None = None
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        # The outer context needs a certificate of its own to be a valid server context;
        # every handshake is moved to the current one before it is used.
        _load_into(self.context, pair)
        self.context.sni_callback = self._select

    @classmethod
    async def create(
        cls,
        *,
        cert_path: str,
        pod_ip: str,
        interval_s: float,
        on_reload: Callable[[str], None] | None = None,
    ) -> ServingTLS:
        """From ``--cert-path``, or self-signed for localhost and the pod IP."""
        if cert_path:
            try:
                pair = await asyncio.to_thread(_read_dir, cert_path)
            except OSError as exc:
                raise ValueError(f"--cert-path: {exc.strerror or exc}: {exc.filename}") from None
            try:
                serving = cls(pair, cert_path=cert_path, interval_s=interval_s, on_reload=on_reload)
            except ssl.SSLError as exc:
                raise ValueError(
                    f"--cert-path {cert_path}: unusable tls.crt/tls.key: {exc}"
                ) from None
            serving.start()
            return serving
        address: str | None = pod_ip
        if not address:
            address = await asyncio.to_thread(host_address)
        ips = (address,) if address else ()
        pair = await asyncio.to_thread(
            self_signed, ("localhost",), ip_addresses=ips, common_name="pd-sidecar"
        )
        log.info({"event": "tls_self_signed", "ip_addresses": ["127.0.0.1", *ips]})
        return cls(pair)

    @property
    def certificate(self) -> bytes:
        """PEM of the certificate new connections get."""
        return self._pair.cert_pem

    def _select(self, conn: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        conn.context = self._current

    def replace(self, pair: CertificatePair) -> None:
        """Serve ``pair`` to new connections (``ssl.SSLError`` if it does not load)."""
        self._current = server_context(pair)
        self._pair = pair

    def start(self) -> None:
        if self.cert_path and self._task is None:
            self._task = asyncio.create_task(self._watch(), name="tls reload")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _watch(self) -> None:
        failed: CertificatePair | None = None
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                pair = await asyncio.to_thread(_read_dir, self.cert_path)
            except OSError as exc:
                log.warning({"event": "tls_reload_failed", "error": str(exc)})
                continue
            if pair == self._pair or pair == failed:
                continue
            try:
                self.replace(pair)
            except ssl.SSLError as exc:
                failed = pair
                log.warning({"event": "tls_reload_failed", "error": str(exc)})
                if self._on_reload is not None:
                    self._on_reload("error")
                continue
            failed = None
            log.info({"event": "tls_reloaded", "cert_path": self.cert_path})
            if self._on_reload is not None:
                self._on_reload("ok")
