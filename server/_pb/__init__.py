"""Generated protobuf and gRPC code (built from proto/, never edited)."""
