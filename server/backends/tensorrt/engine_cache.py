"""The TensorRT engine cache: built engines on disk, keyed so that a restart does not rebuild.

An engine is only valid for the model it was built from, the TensorRT version that built it,
the GPU model (compute capability) it was tuned on, and the build settings (precision flags,
optimisation profile, workspace, optimisation level). The key is a sha256 over exactly these;
changing any of them gives another file, never a stale engine. Pure: no TensorRT needed.

Layout (``<cache>`` is ``trt_engine_cache_dir``, else $PEREGRINE_TRT_CACHE_DIR, else
``$XDG_CACHE_HOME/peregrine/tensorrt``)::

    <cache>/<model>/<key>.plan        the serialized engine
    <cache>/<model>/<key>.json        what the key was made of, build time, when
    <cache>/<model>/<key>.lock        held while one process builds (others wait, then reuse)
    <cache>/timing/<gpu>.cache        TensorRT timing cache, shared by every build on that GPU

Files are written to a temporary name and renamed into place, so a reader never sees half
an engine. Keep the cache outside the model's version directories: files appearing there
would look like a changed version to the repository poller.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.accelerator_options import ShapeRange
from server.security.paths import confined

CACHE_ENV = "PEREGRINE_TRT_CACHE_DIR"
#: Bump when the key's recipe or what a build makes of the same settings changes, so old
#: entries are not mistaken for new ones. 2: fp32 engines are built without TF32.
KEY_SCHEMA = 2


def default_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    explicit = env.get(CACHE_ENV, "").strip()
    if explicit:
        return Path(explicit).expanduser()
    base = env.get("XDG_CACHE_HOME", "").strip() or str(Path("~/.cache").expanduser())
    return Path(base) / "peregrine" / "tensorrt"


def resolve_cache_dir(configured: str | None, model_dir: Path,
                      environ: Mapping[str, str] | None = None) -> Path:
    """``trt_engine_cache_dir`` (relative to the model directory, and inside it: a config
    never makes the server write elsewhere) or the server's default."""
    if configured is None:
        return default_cache_dir(environ)
    return confined(model_dir, configured, "trt_engine_cache_dir")


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class GpuIdentity:
    """What an engine is specific to on the device side."""

    name: str
    compute_capability: tuple[int, int]

    @property
    def slug(self) -> str:
        """A file-name-safe form, e.g. ``nvidia-h100-80gb-hbm3-sm90``."""
        base = re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-") or "gpu"
        return f"{base}-sm{self.compute_capability[0]}{self.compute_capability[1]}"


@dataclass(frozen=True, slots=True)
class BuildSettings:
    """Everything besides the model, TensorRT and GPU that changes the engine."""

    precision_flags: tuple[str, ...]
    profile: Mapping[str, ShapeRange]
    workspace_mb: int | None = None
    builder_optimization_level: int | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "precision_flags": sorted(self.precision_flags),
            "profile": {
                name: {"min": list(r.min), "opt": list(r.opt), "max": list(r.max)}
                for name, r in sorted(self.profile.items())
            },
            "workspace_mb": self.workspace_mb,
            "builder_optimization_level": self.builder_optimization_level,
        }


def key_material(model_sha256: str, trt_version: str, gpu: GpuIdentity,
                 settings: BuildSettings) -> dict[str, Any]:
    return {
        "schema": KEY_SCHEMA,
        "model_sha256": model_sha256,
        "tensorrt": trt_version,
        "gpu": gpu.name,
        "compute_capability": f"{gpu.compute_capability[0]}.{gpu.compute_capability[1]}",
        "build": settings.as_json(),
    }


def engine_cache_key(model_sha256: str, trt_version: str, gpu: GpuIdentity,
                     settings: BuildSettings) -> str:
    """sha256 (hex) of the canonical JSON of everything the engine depends on."""
    material = key_material(model_sha256, trt_version, gpu, settings)
    canonical = json.dumps(material, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "_"


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """Paths of one cached engine."""

    directory: Path
    key: str

    @property
    def plan(self) -> Path:
        return self.directory / f"{self.key}.plan"

    @property
    def metadata(self) -> Path:
        return self.directory / f"{self.key}.json"

    @property
    def lock(self) -> Path:
        return self.directory / f"{self.key}.lock"


def cache_entry(cache_dir: Path, model: str, key: str) -> CacheEntry:
    return CacheEntry(cache_dir / _safe(model), key)


def timing_cache_path(cache_dir: Path, gpu: GpuIdentity, trt_version: str) -> Path:
    return cache_dir / "timing" / f"{gpu.slug}-trt{_safe(trt_version)}.cache"


@contextlib.contextmanager
def build_lock(entry: CacheEntry) -> Iterator[None]:
    """Exclusive across processes (flock) while one of them builds this entry."""
    entry.directory.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: a build may then happen twice, harmlessly
        yield
        return
    with entry.lock.open("a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
