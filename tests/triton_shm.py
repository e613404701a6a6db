"""tritonclient's system shared-memory utilities, importable with a current setuptools.

``tritonclient.utils.shared_memory`` (2.41 and still on the client's main branch) does
``import pkg_resources`` only to locate its bundled ``libcshm.so`` with
``resource_filename``; setuptools 81+ no longer ships ``pkg_resources``. When it is missing we
lend the import a stand-in that answers ``resource_filename`` from ``importlib.resources`` and
withdraw it straight after, so the client's own functions (create/set/get/destroy) run
unchanged, exactly as perf_analyzer and Triton users call them.
"""

from __future__ import annotations

import importlib
import importlib.resources
import sys
import types


def load() -> types.ModuleType:
    """Import and return ``tritonclient.utils.shared_memory``."""
    name = "tritonclient.utils.shared_memory"
    if name in sys.modules:
        return sys.modules[name]
    try:
        import pkg_resources  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        pass
    else:
        return importlib.import_module(name)

    def resource_filename(package: str, resource: str) -> str:
        return str(importlib.resources.files(package) / resource)

    shim = types.ModuleType("pkg_resources")
    shim.resource_filename = resource_filename  # type: ignore[attr-defined]
    sys.modules["pkg_resources"] = shim
    try:
        return importlib.import_module(name)
    finally:
        if sys.modules.get("pkg_resources") is shim:
            del sys.modules["pkg_resources"]
