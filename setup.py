"""Build hooks: generate the gRPC code from proto/ and compile the native extension.

The generated modules land in server/_pb/ (ignored by git): they are produced by every
build, editable or not, and never edited by hand.
"""

from __future__ import annotations

import re
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension
from setuptools import Command, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "server" / "_pb"


def generate_protos() -> None:
    from grpc_tools import protoc  # build-time dependency only

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.glob("*.proto"))
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"--python_out={OUT_DIR}",
        f"--pyi_out={OUT_DIR}",
        f"--grpc_python_out={OUT_DIR}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on " + ", ".join(protos))
    for path in OUT_DIR.glob("*_pb2*.py*"):
        text = path.read_text()
        # protoc writes absolute imports ("import model_config_pb2"): make them package-relative.
        fixed = re.sub(r"^import (\w+_pb2)", r"from . import \1", text, flags=re.M)
        # Register into our private pool (see server/_pb/_pool.py), not the default one.
        if "_descriptor_pool.Default()" in fixed:
            fixed = fixed.replace("_descriptor_pool.Default()", "_PEREGRINE_POOL")
            fixed = fixed.replace(
                "from google.protobuf import descriptor_pool as _descriptor_pool\n",
                "from google.protobuf import descriptor_pool as _descriptor_pool\n"
                "from ._pool import POOL as _PEREGRINE_POOL\n",
            )
        if fixed != text:
            path.write_text(fixed)


class GenerateProtos(Command):
    description = "generate Python gRPC code from proto/"
    user_options: list[tuple[str, str | None, str]] = []

    def initialize_options(self) -> None:
        pass

    def finalize_options(self) -> None:
        pass

    def run(self) -> None:
        generate_protos()


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        generate_protos()
        super().run()


native = Pybind11Extension(
    "server._native",
    sources=["csrc/bindings.cpp"],
    include_dirs=["csrc"],
    depends=[
        "csrc/arena.hpp",
        "csrc/bytes_codec.hpp",
        "csrc/packing.hpp",
        "csrc/preprocess.hpp",
        "csrc/task_pool.hpp",
        "csrc/wire_codec.hpp",
    ],
    cxx_std=17,
    # -ffp-contract=off: no fused multiply-adds, so the preprocessing kernels round exactly
    # as their numpy oracle does (server/preprocess/reference.py). -pthread: the worker pool.
    extra_compile_args=["-O3", "-ffp-contract=off", "-pthread"],
    extra_link_args=["-pthread"],
)

setup(
    ext_modules=[native],
    cmdclass={"build_py": BuildPyWithProtos, "generate_protos": GenerateProtos},
)
