"""Batch packing behind one small facade, so the compiled packer can replace the reference.

``select_packer`` is called by the composition root when a server starts: the environment
variable PEREGRINE_NATIVE=0 selects the numpy reference (for comparison and debugging only),
anything else the compiled packer. Reading it at start, not import, lets two servers in one
process (the tests) run one path each.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from server.interfaces import Packer
from server.packing.native import NativeModelPacker, NativePacker
from server.packing.reference import ReferenceModelPacker, ReferencePacker

#: The environment variable that switches the compiled path off ("0", "false", "no", "off").
NATIVE_ENV = "PEREGRINE_NATIVE"


def native_enabled(environ: Mapping[str, str] | None = None) -> bool:
    value = (os.environ if environ is None else environ).get(NATIVE_ENV, "1")
    return value.strip().lower() not in ("0", "false", "no", "off")


def select_packer(environ: Mapping[str, str] | None = None) -> Packer:
    """The packer a starting server uses: native unless PEREGRINE_NATIVE=0."""
    return NativePacker() if native_enabled(environ) else ReferencePacker()


#: The compiled packer, for code that builds schedulers directly (tests, benchmarks).
default_packer: Packer = NativePacker()

__all__ = [
    "NATIVE_ENV",
    "NativeModelPacker",
    "NativePacker",
    "ReferenceModelPacker",
    "ReferencePacker",
    "default_packer",
    "native_enabled",
    "select_packer",
]
