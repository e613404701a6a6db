"""Certificates for TLS tests, made on the spot with ``cryptography`` (no files checked in).

    ca = Authority("test CA")
    server = ca.issue("server", hosts=("127.0.0.1", "localhost"))   # SAN IP + DNS, serverAuth
    alice = ca.issue("alice", client=True)                          # clientAuth, CN=alice
    cert_path, key_path = server.write(tmp_path, "server")
    ca.write(tmp_path / "ca.pem")

    pki = make_pki(tmp_path)   # all of the usual files at once (see Pki)

Keys are P-256 (fast to make); every certificate gets a fresh random serial unless given one.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALID = dt.timedelta(days=1)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _alt_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, both PEM."""

    cert_pem: bytes
    key_pem: bytes
    serial: int

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        """``<stem>.crt`` and ``<stem>.key`` in ``directory``; returns their paths."""
        cert, key = directory / f"{stem}.crt", directory / f"{stem}.key"
        cert.write_bytes(self.cert_pem)
        key.write_bytes(self.key_pem)
        return cert, key


class Authority:
    """A self-signed CA that issues server and client certificates."""

    def __init__(self, common_name: str = "Peregrine test CA") -> None:
        self._key = _key()
        now = dt.datetime.now(dt.UTC)
        self._name = _name(common_name)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(self._name).issuer_name(self._name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + _VALID)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.cert_pem = self.certificate.public_bytes(serialization.Encoding.PEM)

    def write(self, path: Path) -> Path:
        path.write_bytes(self.cert_pem)
        return path

    def issue(self, common_name: str, *, hosts: Sequence[str] = (), client: bool = False,
              serial: int | None = None) -> Issued:
        """A leaf certificate for ``common_name``: a server's (``hosts`` as subject
        alternative names, IP or DNS) or, with ``client``, a client's (its identity is the
        common name)."""
        key = _key()
        now = dt.datetime.now(dt.UTC)
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name)).issuer_name(self._name)
            .public_key(key.public_key())
            .serial_number(serial if serial is not None else x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + _VALID)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if hosts:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([_alt_name(h) for h in hosts]), critical=False)
        certificate = builder.sign(self._key, hashes.SHA256())
        return Issued(certificate.public_bytes(serialization.Encoding.PEM), _key_pem(key),
                      certificate.serial_number)


def serial_of(cert_pem: bytes | str) -> int:
    """The serial number of a PEM certificate (e.g. one read from a TLS handshake)."""
    data = cert_pem.encode() if isinstance(cert_pem, str) else cert_pem
    return x509.load_pem_x509_certificate(data).serial_number


@dataclass(frozen=True)
class Pki:
    """Files for a TLS test: a CA, a server certificate (key) it issued for ``hosts``, a
    client certificate (CN ``client``) it issued, and a ``stranger`` client certificate
    (CN ``stranger``) issued by another CA."""

    authority: Authority
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path
    stranger_key: Path


def make_pki(directory: Path, hosts: Sequence[str] = ("127.0.0.1", "localhost")) -> Pki:
    ca = Authority()
    server = ca.issue("server", hosts=hosts).write(directory, "server")
    client = ca.issue("client", client=True).write(directory, "client")
    stranger = Authority("another CA").issue("stranger", client=True).write(directory,
                                                                            "stranger")
    return Pki(ca, ca.write(directory / "ca.pem"), *server, *client, *stranger)
