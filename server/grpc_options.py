"""The options of the server's gRPC servers: the single process's, or each frontend's."""

from __future__ import annotations

from server.settings import ServerSettings


def server_options(settings: ServerSettings, reuse_port: bool) -> list[tuple[str, int]]:
    """Message limits, SO_REUSEPORT (frontends share one port; a single server must not
    share it unknowingly) and gRPC core's bound on calls that have arrived but that the event
    loop has not taken yet.

    When the loop is saturated the excess is cancelled there (status CANCELLED), without any
    Python work: the only refusal cheap enough to keep up with a load several times what the
    server sustains. Past --grpc-max-pending-calls gRPC refuses with a probability that rises
    to one at twice the bound.
    """
    limit = settings.grpc_max_message_bytes
    pending = settings.grpc_max_pending_calls
    return [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        ("grpc.server.max_pending_requests", pending),
        ("grpc.server.max_pending_requests_hard_limit", 2 * pending),
    ]
