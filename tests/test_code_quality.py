"""Lint, types and the import layering of DESIGN.md, checked on the whole tree."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVER = ROOT / "server"
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    beside = BIN / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed (pip install -e '.[test]')")
    return found


def run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          check=False)


def test_ruff_is_clean() -> None:
    targets = [p for p in ("server", "tests", "bench", "examples") if (ROOT / p).exists()]
    result = run([tool("ruff"), "check", "--no-cache", *targets])
    assert result.returncode == 0, f"ruff check failed:\n{result.stdout}\n{result.stderr}"


def test_mypy_is_clean() -> None:
    # Configuration (strict for server/) comes from pyproject.toml.
    result = run([tool("mypy")])
    assert result.returncode == 0, f"mypy failed:\n{result.stdout}\n{result.stderr}"


# -- import layering -------------------------------------------------------------------------------


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(source: str, module: str, is_package: bool) -> Iterator[str]:
    """Every module that ``source`` (module ``module``) imports, as absolute names, anywhere."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base = ".".join(base_parts[: len(base_parts) - (node.level - 1)])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            yield target
            # `from server import frontend` imports the subpackage itself.
            for alias in node.names:
                yield f"{target}.{alias.name}"


def imported_modules(path: Path) -> Iterator[str]:
    return imports_of(path.read_text(encoding="utf-8"), module_name(path),
                      path.name == "__init__.py")


def server_modules() -> dict[str, set[str]]:
    modules: dict[str, set[str]] = {}
    for path in sorted(SERVER.rglob("*.py")):
        if "_pb" in path.relative_to(SERVER).parts:
            continue
        modules[module_name(path)] = set(imported_modules(path))
    return modules


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def violations(importer_in: str, forbidden: tuple[str, ...]) -> list[str]:
    found = []
    for module, imports in server_modules().items():
        if not within(module, importer_in):
            continue
        for target in sorted(imports):
            if any(within(target, f) for f in forbidden):
                found.append(f"{module} imports {target}")
    return found


def test_the_walker_sees_the_imports_it_must() -> None:
    # Guards against a walker that finds nothing and so passes every rule below.
    modules = server_modules()
    assert "server.app" in modules and "server.scheduler.batcher" in modules
    assert any(within(t, "server.frontend") for t in modules["server.app"])
    assert any(within(t, "server.backends") for t in modules["server.app"])
    assert "server.scheduler.policy" in modules["server.scheduler.batcher"]


def test_relative_and_from_imports_are_resolved() -> None:
    source = ("from . import policy\nfrom ..frontend import status\nfrom .queue import x\n"
              "from server import backends\nimport server.repository.manager as m\n"
              "def later() -> None:\n    from server.dataplane import DataPlane\n")
    found = set(imports_of(source, "server.scheduler.probe", is_package=False))
    assert {"server.scheduler.policy", "server.frontend.status", "server.scheduler.queue",
            "server.backends", "server.repository.manager", "server.dataplane"} <= found
    in_package = set(imports_of("from . import x\n", "server.scheduler", is_package=True))
    assert "server.scheduler.x" in in_package


def test_nothing_but_the_app_imports_the_frontend() -> None:
    found = [
        f"{module} imports {target}"
        for module, imports in server_modules().items()
        if module != "server.app" and not within(module, "server.frontend")
        for target in sorted(imports)
        if within(target, "server.frontend")
    ]
    assert not found, "\n".join(found)


def test_backends_know_nothing_of_scheduler_frontend_repository_dataplane() -> None:
    found = violations("server.backends", ("server.scheduler", "server.frontend",
                                           "server.repository", "server.dataplane"))
    assert not found, "\n".join(found)


def test_security_policy_knows_nothing_of_the_planes_or_the_frontend() -> None:
    found = violations("server.security", ("server.frontend", "server.repository",
                                           "server.scheduler", "server.backends",
                                           "server.dataplane", "server.control"))
    assert not found, "\n".join(found)


def test_scheduler_knows_nothing_of_frontend_repository_backends() -> None:
    found = violations("server.scheduler", ("server.frontend", "server.repository",
                                            "server.backends"))
    assert not found, "\n".join(found)


def test_only_the_app_imports_concrete_backends() -> None:
    found = [
        f"{module} imports {target}"
        for module, imports in server_modules().items()
        if module != "server.app" and not within(module, "server.backends")
        for target in sorted(imports)
        if within(target, "server.backends")
    ]
    assert not found, "\n".join(found)


def test_the_frontend_reaches_models_only_through_the_planes() -> None:
    """Servicers translate; the control plane and the data plane own everything else."""
    found = violations("server.frontend", ("server.repository", "server.scheduler",
                                           "server.backends", "server.drift.analyser"))
    assert not found, "\n".join(found)


def test_tracing_knows_nothing_of_the_planes_or_what_they_reach() -> None:
    """Tracing is handed its hooks by the composition root: the frontend wraps handlers with
    it, the batchers call it through an interface."""
    found = violations("server.tracing", ("server.frontend", "server.dataplane",
                                          "server.control", "server.repository",
                                          "server.scheduler", "server.backends",
                                          "server.routing", "server.drift"))
    assert not found, "\n".join(found)


def test_routing_speaks_no_wire_format() -> None:
    found = violations("server.routing", ("server._pb", "server.frontend", "server.codec"))
    assert not found, "\n".join(found)


def test_the_repository_does_not_build_schedulers() -> None:
    """The composition root injects the scheduler factory."""
    found = violations("server.repository", ("server.scheduler", "server.frontend",
                                             "server.dataplane", "server.routing"))
    assert not found, "\n".join(found)


def test_interfaces_and_the_data_plane_depend_on_no_implementation() -> None:
    allowed = ("server.interfaces", "server.spec", "server.types", "server.errors",
               "server.parameters", "server.codec.validate", "server.security.names")
    modules = server_modules()
    found = [
        f"{module} imports {target}"
        for module in ("server.interfaces", "server.dataplane")
        for target in sorted(modules[module])
        if within(target, "server") and target != "server"
        and not any(within(target, a) for a in allowed)
    ]
    assert not found, "\n".join(found)


def test_the_rest_frontend_only_translates() -> None:
    """REST requests become gRPC calls on the server's own handlers: server/rest reaches
    nothing else of the server (and a frontend process imports it)."""
    found = violations("server.rest", ("server.frontend", "server.control", "server.dataplane",
                                       "server.admission", "server.codec", "server.repository",
                                       "server.scheduler", "server.backends", "server.routing",
                                       "server.shm", "server.app"))
    assert not found, "\n".join(found)
