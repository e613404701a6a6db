"""TLS for the gRPC and HTTP listeners: the PEM files checked at start, and re-read when they
change.

gRPC asks :meth:`CertificateFiles.fetch` for the certificate configuration before each new
TLS handshake (``grpc.dynamic_ssl_server_credentials``; grpc.aio honours it). The fetcher
compares the files' ``stat`` signatures (device, inode, size, mtime: a Kubernetes Secret
update swaps a symlink, which changes the inode) and only then reads and checks them, so a
handshake costs a few ``stat`` calls. New connections get the new certificate; connections
already open keep theirs. A pair that does not check out (a half-written rotation, a key of
another certificate) is logged once and the previous certificate stays in use. The HTTP
listener (:func:`https_context`) checks the same files the same way at each handshake, from
its SSL context's server-name callback.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

from server.settings import ServerSettings

log = logging.getLogger(__name__)

#: What a file's ``stat`` gives to tell a new version from the one loaded.
Signature = tuple[int, int, int, int]


class TlsFileError(OSError):
    """A TLS file is missing, unreadable, not PEM, or the key does not match the certificate."""


@dataclass(frozen=True, slots=True)
class _Loaded:
    signatures: tuple[Signature, ...]
    configuration: grpc.ServerCertificateConfiguration
    #: The client CA certificates (PEM), when there are some.
    root: bytes | None


def _signature(path: Path, flag: str) -> Signature:
    try:
        status = os.stat(path)
    except OSError as exc:
        raise TlsFileError(f"{flag} {path}: {exc.strerror or exc}") from None
    return status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns


def _read(path: Path, flag: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TlsFileError(f"{flag} {path}: {exc.strerror or exc}") from None


def _check_certificates(data: bytes, path: Path, flag: str) -> None:
    """At least one PEM certificate, every one of them well-formed."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=data.decode("ascii"))
    except (ValueError, ssl.SSLError) as exc:
        raise TlsFileError(f"{flag} {path}: not PEM certificates ({exc})") from None


def _encrypted(key: Path) -> bytes:
    """The password callback: without it OpenSSL would prompt on the terminal."""
    raise TlsFileError(f"--grpc-server-key {key}: an encrypted key (gRPC needs it unencrypted)")


def _check_pair(cert: Path, key: Path) -> None:
    """The key is an unencrypted PEM private key of the (first) certificate."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(
            cert, key, password=lambda: _encrypted(key))
    except ssl.SSLError as exc:
        reason = ("the key does not match the certificate" if "MISMATCH" in str(exc)
                  else f"not a PEM private key ({exc})")
        raise TlsFileError(f"--grpc-server-key {key}: {reason}") from None


class CertificateFiles:
    """The listener's certificate chain, key and (for mutual TLS) client CA, as files."""

    def __init__(self, cert: Path, key: Path, root: Path | None, mutual: bool) -> None:
        self._files = [(cert, "--grpc-server-cert"), (key, "--grpc-server-key")]
        if root is not None:
            self._files.append((root, "--grpc-root-cert"))
        self.mutual = mutual
        self._lock = threading.Lock()
        #: The signatures of files that did not check out, and why: not retried, logged once.
        self._rejected: tuple[Signature, ...] | None = None
        self._problem = ""
        loaded = self._load()
        if loaded is None:
            raise TlsFileError("the TLS files changed while they were read; start again")
        self._loaded = loaded

    @property
    def configuration(self) -> grpc.ServerCertificateConfiguration:
        return self._loaded.configuration

    @property
    def root(self) -> bytes | None:
        """The client CA certificates as loaded now."""
        return self._loaded.root

    def _signatures(self) -> tuple[Signature, ...]:
        return tuple(_signature(path, flag) for path, flag in self._files)

    def _load(self) -> _Loaded | None:
        """Read and check every file; None when one changed meanwhile (a rotation under
        way: the next handshake tries again). Raises :class:`TlsFileError`."""
        before = self._signatures()
        contents = [_read(path, flag) for path, flag in self._files]
        (cert, cert_flag), (key, _) = self._files[:2]
        _check_certificates(contents[0], cert, cert_flag)
        _check_pair(cert, key)
        root = None
        if len(self._files) == 3:
            root = contents[2]
            _check_certificates(root, *self._files[2])
        if self._signatures() != before:
            return None
        configuration = grpc.ssl_server_certificate_configuration(
            [(contents[1], contents[0])], root_certificates=root)
        return _Loaded(before, configuration, root)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's fetcher, called before each handshake on one of its threads: a new
        configuration when the files changed and check out, else None (keep the current)."""
        return self._loaded.configuration if self.reload() else None

    def reload(self) -> bool:
        """Whether the files changed and check out (then they are the ones loaded now)."""
        with self._lock:
            seen = None
            try:
                seen = self._signatures()
                if seen in (self._loaded.signatures, self._rejected):
                    return False
                loaded = self._load()
            except TlsFileError as exc:
                self._reject(seen, str(exc))
                return False
            if loaded is None:
                return False
            self._loaded, self._rejected, self._problem = loaded, None, ""
        log.info("TLS certificate reloaded", extra={"cert": str(self._files[0][0])})
        return True

    def ssl_context(self) -> ssl.SSLContext | None:
        """An SSL context of the files as loaded now (None if they changed meanwhile). As on
        the gRPC listener, a client certificate is asked for only under mutual TLS, and then
        required."""
        with self._lock:
            loaded = self._loaded
            (cert, _), (key, _) = self._files[:2]
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            try:
                context.load_cert_chain(cert, key, password=lambda: _encrypted(key))
            except (OSError, ssl.SSLError):
                return None  # replaced since they were checked: the next handshake retries
            if self.mutual and loaded.root is not None:
                context.load_verify_locations(cadata=loaded.root.decode("ascii"))
                context.verify_mode = ssl.CERT_REQUIRED
            return context if self._signatures() == loaded.signatures else None

    def _reject(self, seen: tuple[Signature, ...] | None, problem: str) -> None:
        self._rejected = seen
        if problem != self._problem:
            self._problem = problem
            log.warning("TLS files not reloaded; the previous certificate stays in use",
                        extra={"error": problem})

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self.configuration, self.fetch, require_client_authentication=self.mutual)


def _files(settings: ServerSettings) -> CertificateFiles | None:
    if not settings.grpc_use_ssl:
        return None
    # ServerSettings guarantees both when grpc_use_ssl is true.
    assert settings.grpc_server_cert is not None and settings.grpc_server_key is not None
    return CertificateFiles(settings.grpc_server_cert, settings.grpc_server_key,
                            settings.grpc_root_cert, settings.grpc_use_ssl_mutual)


def server_credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    """The gRPC listener's credentials: None for plaintext (--grpc-use-ssl false)."""
    files = _files(settings)
    return None if files is None else files.credentials()


def https_context(settings: ServerSettings) -> ssl.SSLContext | None:
    """The HTTP listener's SSL context, with the gRPC listener's certificates (None for
    plaintext). At each handshake the files are checked as gRPC checks them: a new
    certificate and key take effect for new connections (a client CA added to the root file
    too; one removed from it only at restart, as an SSL context only adds CAs)."""
    files = _files(settings)
    if files is None:
        return None
    context = files.ssl_context()
    if context is None:
        raise TlsFileError("the TLS files changed while they were read; start again")
    listener = context
    current = context

    def handshake(connection: ssl.SSLObject, _server_name: str | None,
                  _context: ssl.SSLContext) -> None:
        nonlocal current
        if files.reload():
            newer = files.ssl_context()
            if newer is not None:
                current = newer
                root = files.root
                if files.mutual and root is not None:
                    listener.load_verify_locations(cadata=root.decode("ascii"))
        if current is not listener:
            connection.context = current

    listener.sni_callback = handshake  # called for every handshake, with or without SNI
    return listener
