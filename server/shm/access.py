"""Who may register client shared memory: the server's switch and the caller's host.

Registering a region makes the server open a file under /dev/shm with its own rights and
read and write it for the caller, so it is off unless the operator turns it on
(``--allow-client-shm``), and only callers on this host may do it unless
``--shm-remote-registration`` says otherwise: a remote client has no business naming this
host's shared-memory objects.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import grpc

from server.errors import PeregrineError


class SharedMemoryDisabled(PeregrineError):
    """Register or Unregister while client shared memory is off. UNAVAILABLE, the status
    Triton answers for a shared-memory protocol it does not open to the caller
    (``--grpc-restricted-protocol``)."""

    code = grpc.StatusCode.UNAVAILABLE


class RemotePeer(PeregrineError):
    """Register from a peer that is not on this host."""

    code = grpc.StatusCode.PERMISSION_DENIED


def is_local_peer(peer: str) -> bool:
    """Whether gRPC's ``context.peer()`` is on this host: a unix socket or a loopback address
    (``ipv4:127.0.0.1:5555``, ``ipv6:[::1]:5555``, ``ipv6:[::ffff:127.0.0.1]:5555``).

    A connection to one of the host's other addresses is not recognised as local: same-host
    clients use loopback or a unix socket.
    """
    scheme, _, address = peer.partition(":")
    if scheme in ("unix", "unix-abstract"):
        return True
    if scheme not in ("ipv4", "ipv6"):
        return False
    host = address.rpartition(":")[0]
    if scheme == "ipv6":
        host = host.removeprefix("[").removesuffix("]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


@dataclass(frozen=True, slots=True)
class RegistrationGate:
    """``enabled``: --allow-client-shm; ``remote``: --shm-remote-registration."""

    enabled: bool = False
    remote: bool = False

    def check_enabled(self) -> None:
        if not self.enabled:
            raise SharedMemoryDisabled(
                "system shared memory is disabled on this server; start it with "
                "--allow-client-shm true to let clients register regions"
            )

    def check_register(self, peer: str) -> None:
        """Refuse a registration while the feature is off or from a peer on another host."""
        self.check_enabled()
        if not self.remote and not is_local_peer(peer):
            raise RemotePeer(
                "system shared memory can only be registered from this host (a loopback "
                f"address or a unix socket), not from '{peer}'; --shm-remote-registration "
                "true accepts other peers"
            )
