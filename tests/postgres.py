"""A throwaway PostgreSQL server on 127.0.0.1 for tests: the system's binaries (Debian's
postgresql package: initdb, pg_ctl, on PATH or under /usr/lib/postgresql/<major>/bin), else
the ones the ``pgserver`` package bundles. initdb refuses to run as root, so as root the
cluster belongs to the unprivileged ``nobody`` (through runuser). ``start`` returns None and
the reason when neither way is possible."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _binaries() -> Path | None:
    found = shutil.which("pg_ctl")
    if found is not None and shutil.which("initdb") is not None:
        return Path(found).resolve().parent
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "initdb").exists() and (candidate / "pg_ctl").exists():
            return candidate
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _as_owner(args: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return args
    runuser = shutil.which("runuser")
    if runuser is None:
        raise RuntimeError("running as root without runuser: initdb refuses root")
    return [runuser, "-u", "nobody", "--", *args]


@contextmanager
def postgres_url() -> Iterator[str]:
    """A SQLAlchemy URL (psycopg 3) of a fresh database; raises RuntimeError with the reason
    when no server can be started here."""
    binaries = _binaries()
    if binaries is None:
        with _pgserver_url() as url:
            yield url
        return
    home = Path(tempfile.mkdtemp(prefix="peregrine-pg-"))
    home.chmod(0o777)
    data, sockets = home / "data", home / "sock"
    sockets.mkdir()
    sockets.chmod(0o777)
    port = _free_port()
    if os.geteuid() == 0:
        shutil.chown(home, "nobody")
    try:
        _run(_as_owner([str(binaries / "initdb"), "-D", str(data), "-A", "trust", "-U",
                        "postgres", "--no-sync", "-E", "UTF8"]))
        _run(_as_owner([str(binaries / "pg_ctl"), "-D", str(data), "-w", "-l",
                        str(home / "log"), "-o",
                        f"-h 127.0.0.1 -p {port} -k {sockets} -F", "start"]))
        try:
            yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
        finally:
            _run(_as_owner([str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate",
                            "stop"]))
    finally:
        shutil.rmtree(home, ignore_errors=True)


@contextmanager
def _pgserver_url() -> Iterator[str]:
    try:
        import pgserver
    except ImportError:
        raise RuntimeError("no PostgreSQL binaries (initdb, pg_ctl) and no pgserver "
                           "package") from None
    home = Path(tempfile.mkdtemp(prefix="peregrine-pgserver-"))
    server = pgserver.get_server(home, cleanup_mode="stop")
    try:
        yield server.get_uri().replace("postgresql://", "postgresql+psycopg://", 1)
    finally:
        server.cleanup()
        shutil.rmtree(home, ignore_errors=True)


def _run(args: list[str]) -> None:
    result = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{Path(args[-1]).name}: {result.stderr.strip() or result.stdout}")
