"""How the client commands reach a server: address, TLS and bearer token, from one set of flags.

``peregrine repo``, ``route``, ``health``, ``drift status`` and ``bench run`` add the flags
with :func:`add_connection_arguments` and get a :class:`ClientSecurity` from
:func:`client_security`. The token goes as ``authorization: Bearer <token>`` call metadata:
callers pass :attr:`ClientSecurity.metadata` on every call (built once; on a stream, once per
stream).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

TOKEN_ENV = "PEREGRINE_TOKEN"
DEFAULT_URL = "127.0.0.1:8001"
#: Call metadata as the stubs take it.
Metadata = tuple[tuple[str, str], ...]
#: gRPC's channel option naming the host the server's certificate must be issued to.
TARGET_NAME_OPTION = "grpc.ssl_target_name_override"


def add_connection_arguments(parser: argparse._ActionsContainer, defaults: bool = True) -> None:
    """The connection flags. ``defaults`` False: absent flags leave the namespace alone (for a
    subcommand's copy of flags its parent also takes, as ``peregrine route`` does)."""

    def default(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument("--url", default=default(DEFAULT_URL),
                        help=f"server address (host:port); default {DEFAULT_URL}")
    parser.add_argument("--token", default=default(None),
                        help="bearer token, sent as 'authorization: Bearer TOKEN' on every "
                        f"call; default: the {TOKEN_ENV} environment variable (which keeps it "
                        "out of the process list)")
    parser.add_argument("--ssl", action="store_true", default=default(False),
                        help="connect with TLS")
    parser.add_argument("--root-cert", type=Path, default=default(None), metavar="PEM",
                        help="with --ssl: CA certificates to verify the server with "
                        "(default: the system's)")
    parser.add_argument("--client-cert", type=Path, default=default(None), metavar="PEM",
                        help="with --ssl: this client's certificate chain, for mutual TLS")
    parser.add_argument("--client-key", type=Path, default=default(None), metavar="PEM",
                        help="with --ssl: the private key of --client-cert")
    parser.add_argument("--ssl-target-name", default=default(""), metavar="NAME",
                        help="with --ssl: the host name the server's certificate must name, "
                        "when it differs from the url's host (e.g. connecting by IP)")


def _read(path: Path | None, flag: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{flag} {path}: {exc.strerror or exc}") from None


@dataclass(frozen=True, slots=True)
class ClientSecurity:
    """How to reach a server: TLS and the token. Plain data (it crosses to the bench's worker
    processes), PEM contents read once; the default is plaintext without a token."""

    token: str = ""
    ssl: bool = False
    root_cert: bytes | None = None
    client_cert: bytes | None = None
    client_key: bytes | None = None
    ssl_target_name: str = ""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ClientSecurity:
        """From :func:`add_connection_arguments`' flags; ValueError names a bad flag."""
        token = getattr(args, "token", None)
        ssl = getattr(args, "ssl", False)
        given = [flag for flag, name in (("--root-cert", "root_cert"),
                                         ("--client-cert", "client_cert"),
                                         ("--client-key", "client_key"),
                                         ("--ssl-target-name", "ssl_target_name"))
                 if getattr(args, name, None)]
        if given and not ssl:
            raise ValueError(f"{', '.join(given)} needs --ssl")
        cert, key = getattr(args, "client_cert", None), getattr(args, "client_key", None)
        if (cert is None) != (key is None):
            raise ValueError("--client-cert and --client-key go together")
        return cls(
            token=(os.environ.get(TOKEN_ENV, "") if token is None else token).strip(),
            ssl=ssl,
            root_cert=_read(getattr(args, "root_cert", None), "--root-cert"),
            client_cert=_read(cert, "--client-cert"),
            client_key=_read(key, "--client-key"),
            ssl_target_name=getattr(args, "ssl_target_name", ""),
        )

    @property
    def metadata(self) -> Metadata:
        """The call metadata every call carries: the bearer token, when there is one."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def credentials(self) -> grpc.ChannelCredentials | None:
        """TLS channel credentials; None for plaintext."""
        if not self.ssl:
            return None
        return grpc.ssl_channel_credentials(self.root_cert, self.client_key, self.client_cert)

    def options(self, base: Sequence[tuple[str, Any]] = ()) -> list[tuple[str, Any]]:
        """Channel options: ``base`` plus the certificate's host name override."""
        extra = [(TARGET_NAME_OPTION, self.ssl_target_name)] if self.ssl_target_name else []
        return [*base, *extra]

    def channel(self, url: str) -> grpc.Channel:
        credentials = self.credentials()
        if credentials is None:
            return grpc.insecure_channel(url, options=self.options())
        return grpc.secure_channel(url, credentials, options=self.options())

    def aio_channel(self, url: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
        credentials = self.credentials()
        if credentials is None:
            return grpc.aio.insecure_channel(url, options=self.options(options))
        return grpc.aio.secure_channel(url, credentials, options=self.options(options))


def client_security(args: argparse.Namespace, prog: str) -> ClientSecurity:
    """What the flags ask for; a bad combination or an unreadable file exits 2 with one
    line, as a bad flag does."""
    try:
        return ClientSecurity.from_args(args)
    except ValueError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def redact_token(argv: Sequence[str]) -> list[str]:
    """``argv`` with the value of --token hidden, for records of the command line."""
    redacted, hide = [], False
    for arg in argv:
        if hide:
            arg, hide = "***", False
        elif arg == "--token":
            hide = True
        elif arg.startswith("--token="):
            arg = "--token=***"
        redacted.append(arg)
    return redacted
