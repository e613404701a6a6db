"""``peregrine auth add``: a new identity in an auth file, and its token (shown once)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from server.security.auth_file import identity_stanza, new_token, read_auth_file
from server.security.identity import Role
from server.security.ratelimit import parse_limit
from server.settings import parse_names


def add_auth_parser(commands: Any) -> None:
    auth = commands.add_parser(
        "auth", help="manage the auth file (identities, roles, tokens)",
        description="Identities for --auth-file. The server re-reads the file when it changes.",
    )
    actions = auth.add_subparsers(dest="auth_command", required=True)
    add = actions.add_parser(
        "add", help="add an identity; prints its new token (stored only as a salted hash)")
    add.add_argument("name", help="the identity's name (audit log, metrics)")
    add.add_argument("--auth-file", type=Path, required=True,
                     help="the TOML file to append to (created with mode 0600)")
    add.add_argument("--roles", type=parse_names, required=True,
                     help=f"comma-separated: {', '.join(r.value for r in Role)}")
    add.add_argument("--models", type=parse_names, default=None,
                     help="comma-separated models it may use (default: all)")
    add.add_argument("--certificate-name", action="append", default=[],
                     help="a client certificate CN or SAN that proves this identity "
                     "(mutual TLS); with it, no token is made unless --token too")
    add.add_argument("--token", action="store_true",
                     help="make a token even with --certificate-name")
    add.add_argument("--rate-limit", type=parse_limit, default=None, metavar="RATE[:BURST]",
                     help="requests per second for this identity")


def run_auth(args: argparse.Namespace) -> int:
    try:
        roles = [Role(r).value for r in args.roles]
    except ValueError:
        print(f"peregrine auth add: roles are {', '.join(r.value for r in Role)}",
              file=sys.stderr)
        return 2
    path: Path = args.auth_file
    token = stored = None
    if args.token or not args.certificate_name:
        token, stored = new_token()
    existing = path.read_text(encoding="utf-8") if path.exists() else ""
    stanza = identity_stanza(args.name, roles, args.models, stored, args.certificate_name,
                             args.rate_limit)
    text = (existing + ("\n" if existing and not existing.endswith("\n\n") else "") + stanza)
    candidate = path.with_name(path.name + ".new")
    fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)
    try:
        read_auth_file(candidate)  # the file as the server will read it, checked first
    except ValueError as exc:
        candidate.unlink()
        print(f"peregrine auth add: {exc}", file=sys.stderr)
        return 2
    os.replace(candidate, path)
    if token is not None:
        print(token)
        print(f"identity '{args.name}' added to {path}; give the token above to the client "
              "(it is not stored and cannot be shown again)", file=sys.stderr)
    else:
        print(f"identity '{args.name}' added to {path}", file=sys.stderr)
    return 0
