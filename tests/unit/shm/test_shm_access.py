"""Who may register client shared memory: the switch (--allow-client-shm) and the peer's host
(--shm-remote-registration)."""

from __future__ import annotations

import grpc
import pytest

from server.shm import RegistrationGate, RemotePeer, SharedMemoryDisabled, is_local_peer

LOCAL = ["ipv4:127.0.0.1:5555", "ipv4:127.8.9.10:1", "ipv6:[::1]:5555",
         "ipv6:[::ffff:127.0.0.1]:5555", "unix:/run/peregrine.sock", "unix:",
         "unix-abstract:peregrine"]
REMOTE = ["ipv4:10.0.0.7:4242", "ipv4:192.168.1.2:80", "ipv6:[2001:db8::1]:5555",
          "ipv6:[::ffff:10.0.0.7]:5555", "ipv6:[fe80::1%eth0]:5555", "ipv4:0.0.0.0:1",
          "ipv4:localhost:1", "vsock:3:1024", "", "garbage"]


@pytest.mark.parametrize("peer", LOCAL)
def test_loopback_and_unix_peers_are_local(peer: str) -> None:
    assert is_local_peer(peer)


@pytest.mark.parametrize("peer", REMOTE)
def test_other_peers_are_not(peer: str) -> None:
    assert not is_local_peer(peer)


def test_off_refuses_register_and_unregister() -> None:
    gate = RegistrationGate(enabled=False, remote=True)
    with pytest.raises(SharedMemoryDisabled, match="--allow-client-shm true") as err:
        gate.check_register(LOCAL[0])
    assert err.value.code is grpc.StatusCode.UNAVAILABLE
    with pytest.raises(SharedMemoryDisabled):
        gate.check_enabled()
    with pytest.raises(SharedMemoryDisabled):
        RegistrationGate().check_register(LOCAL[0])  # off by default


def test_remote_peers_need_the_flag() -> None:
    local_only = RegistrationGate(enabled=True)
    local_only.check_register(LOCAL[0])
    with pytest.raises(RemotePeer, match="--shm-remote-registration") as err:
        local_only.check_register("ipv4:10.0.0.7:4242")
    assert err.value.code is grpc.StatusCode.PERMISSION_DENIED
    assert "10.0.0.7" in err.value.message
    RegistrationGate(enabled=True, remote=True).check_register("ipv4:10.0.0.7:4242")
    local_only.check_enabled()  # unregistering is not tied to the peer
