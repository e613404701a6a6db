"""Batch packing behind one small facade, so the compiled packer can replace the reference."""

from server.packing.reference import ReferencePacker

default_packer = ReferencePacker()

__all__ = ["ReferencePacker", "default_packer"]
