"""gRPC frontends: translate protobuf to internal types and back, nothing more."""
