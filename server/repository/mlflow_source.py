"""The MLflow Model Registry as a model source.

Registered model versions are referenced as ``name@alias`` (follows the alias) or
``name/version`` (pinned), optionally ``served=ref`` to serve under another name. ``fetch``
resolves the references, downloads each version's ONNX file (or, for a version without
one, its MLflow model: the MLmodel file and the files around it, served by the
``mlflow_pyfunc`` backend) into a local cache in Triton's layout and returns the model's
directory there::

    <cache>/<served>/config.pbtxt                 only when an artifact brings one (or several
                                                  versions are served side by side)
    <cache>/<served>/<version>/model.onnx         the registry version number is the served one
                            or MLmodel, model.pkl... an MLflow model's files as logged
    <cache>/<served>/<version>/model_card.json    MLflow metadata -> card.mlflow.* parameters
    <cache>/<served>/.stash/<version>/            versions no ref resolves to any more, kept
                                                  for reuse (an alias moved back is no download)

The model directory holds exactly the versions the references resolve to, so when an alias
moves (3 -> 4) the repository manager sees version 4 appear and 3 disappear and hot-swaps.
``fingerprint`` is one cheap registry query per reference (no download), so poll mode follows
alias moves. mlflow is an optional extra: this module imports it only when a source is built.

What the registry answers becomes paths here, so it is checked first: a version number must be
digits, every part of an artifact's path a plain name (server/security/names.py), and a
version's files together at most MAX_DOWNLOAD_BYTES. The tracking URI may carry credentials
(``user:password@``, a token parameter): it is shown only redacted (server/security/redact.py),
in model cards, reasons, errors and logs alike.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

from google.protobuf import text_format

from server._pb import model_config_pb2 as mc
from server.atomic_file import write_atomically
from server.errors import InvalidInput, ModelLoadError, ModelNotFound
from server.repository import model_config as config_io
from server.repository.cards import CARD_FILE
from server.security.names import check_model_name, check_name
from server.security.paths import hide_paths
from server.security.redact import redact_uri

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.store.artifact.artifact_repo import ArtifactRepository

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
STASH_DIR = ".stash"
#: Retired versions kept in the stash per model (the most recently retired ones).
STASH_KEEP = 3
#: How deep below a version's artifact root the search for the model files goes.
SEARCH_DEPTH = 4
#: The most one version's files (the ONNX file, its external weights, a config; an MLflow
#: model's files) may weigh.
MAX_DOWNLOAD_BYTES = 2 << 30
#: MLflow client settings for a server: fail within seconds when the registry is unreachable
#: (MLflow's defaults retry for about four minutes, which would stall start-up and every poll),
#: no progress bars in the logs, no usage telemetry. Variables already set win.
CLIENT_ENVIRONMENT = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}
_T = TypeVar("_T")
#: References with the registry versions they resolve to (MlflowSource.list shadows ``list``).
Resolved: TypeAlias = "list[tuple[ModelRef, ModelVersion]]"


@dataclass(frozen=True, slots=True)
class ModelRef:
    """One ``[served=]name@alias`` or ``[served=]name/version`` reference."""

    served_name: str
    registry_name: str
    alias: str = ""
    version: str = ""

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        """Parse one reference; ValueError says what is wrong with it.

        MLflow model names cannot hold '/' or ':', so the last '/' or '@' separates the
        version or alias; a served name (before the first '=') cannot hold '='.
        """
        ref = text.strip()
        served, has_served, rest = ref.partition("=")
        if not has_served:
            served, rest = "", ref
        rest = rest.strip().removeprefix("models:/")
        alias = version = ""
        if "@" in rest:
            name, _, alias = rest.rpartition("@")
            if not alias or "/" in alias:
                raise ValueError(f"invalid alias '{alias}'")
        elif "/" in rest:
            name, _, version = rest.rpartition("/")
            if not version.isdigit() or int(version) <= 0:
                raise ValueError(f"version must be a positive integer, got '{version}'")
            version = str(int(version))
        else:
            raise ValueError("expected NAME@ALIAS or NAME/VERSION")
        if not name or "/" in name or ":" in name:
            raise ValueError(f"invalid registered model name '{name}'")
        served = served.strip() or name
        try:
            check_model_name(served)
        except InvalidInput as exc:
            raise ValueError(f"served name cannot be a directory name: {exc.message}") from None
        return cls(served_name=served, registry_name=name, alias=alias, version=version)

    def __str__(self) -> str:
        target = f"{self.registry_name}@{self.alias}" if self.alias else \
            f"{self.registry_name}/{self.version}"
        return target if self.served_name == self.registry_name else \
            f"{self.served_name}={target}"


def parse_refs(texts: Iterable[str]) -> dict[str, tuple[ModelRef, ...]]:
    """Served name -> its references (duplicates dropped). Raises ModelLoadError on a bad
    reference, or when one served name mixes registered models (their versions would clash).
    """
    grouped: dict[str, list[ModelRef]] = {}
    for text in texts:
        try:
            ref = ModelRef.parse(text)
        except ValueError as exc:
            raise ModelLoadError(f"invalid MLflow model reference '{text}': {exc}") from None
        refs = grouped.setdefault(ref.served_name, [])
        if refs and refs[0].registry_name != ref.registry_name:
            raise ModelLoadError(
                f"served model '{ref.served_name}' names two registered models, "
                f"'{refs[0].registry_name}' and '{ref.registry_name}'; serve one of them under "
                "another name (SERVED=NAME@ALIAS)"
            )
        if ref not in refs:
            refs.append(ref)
    if not grouped:
        raise ModelLoadError("the MLflow model source needs at least one model reference")
    return {name: tuple(refs) for name, refs in grouped.items()}


class MlflowSource:
    """Registered model versions of an MLflow tracking server, materialised in ``cache_dir``.

    Blocking; the repository calls it from worker threads. One lock per served model keeps
    two fetches of the same model from rearranging its directory at once.
    """

    def __init__(self, tracking_uri: str, models: Sequence[str], cache_dir: Path) -> None:
        self._refs = parse_refs(models)
        try:
            from mlflow import MlflowClient
        except ImportError as exc:
            raise ModelLoadError(
                f"the MLflow model source needs the mlflow client ({exc}); "
                "install it with: pip install 'peregrine[mlflow]'"
            ) from None
        for key, value in CLIENT_ENVIRONMENT.items():
            os.environ.setdefault(key, value)
        self.tracking_uri = tracking_uri
        #: The tracking URI as shown anywhere (cards, errors, logs): without credentials.
        self.shown_uri = redact_uri(tracking_uri)
        self.cache_dir = cache_dir
        self._client: MlflowClient = MlflowClient(tracking_uri=tracking_uri,
                                                  registry_uri=tracking_uri)
        self._locks = {name: threading.Lock() for name in self._refs}

    def list(self) -> list[str]:
        """The configured served names: a registry outage then never unloads a model."""
        return sorted(self._refs)

    def fingerprint(self, name: str) -> str:
        """The resolved versions with their aliases and update times: one registry query per
        reference, no download. Never raises (the manager asks before every load): a failure
        gives a fingerprint of its own, so the model is fetched again once the registry
        answers differently, and ``fetch`` reports the error.
        """
        try:
            resolved = self._resolve(self._model_refs(name))
        except (ModelLoadError, ModelNotFound) as exc:
            return f"unavailable: {exc}"
        state = [
            (str(ref), version.version, version.last_updated_timestamp,
             sorted(version.aliases), version.status)
            for ref, version in resolved
        ]
        return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()

    def fetch(self, name: str) -> Path:
        refs = self._model_refs(name)
        with self._locks[name]:
            resolved = self._resolve(refs)
            versions = {version.version: version for _, version in resolved}
            model_dir = self.cache_dir / name
            try:
                model_dir.mkdir(parents=True, exist_ok=True)
                for leftover in model_dir.glob(".download-*"):
                    shutil.rmtree(leftover, ignore_errors=True)
                for version in versions.values():
                    self._materialise(model_dir, version)
                _write_config(model_dir, name, sorted(versions, key=int))
                _stash_others(model_dir, set(versions))
            except OSError as exc:
                log.error("cannot write the MLflow model cache",
                          extra={"model": name, "error": repr(exc)})
                raise ModelLoadError(f"cannot cache model '{name}' in the model cache: "
                                     f"{exc.strerror or type(exc).__name__}") from exc
            except ModelLoadError as exc:  # an artifact's config.pbtxt, named by its path
                raise ModelLoadError(hide_paths(str(exc), [model_dir])) from None
        return model_dir

    # -- registry ------------------------------------------------------------------------------

    def _model_refs(self, name: str) -> tuple[ModelRef, ...]:
        refs = self._refs.get(name)
        if refs is None:
            raise ModelNotFound(f"model '{name}' is not among the MLflow models served "
                                f"({', '.join(sorted(self._refs))})")
        return refs

    def _call(self, what: str, call: Callable[[], _T]) -> _T:
        """Run one MLflow client call; any failure becomes a ModelLoadError saying what was
        asked of which registry (the client raises MlflowException, requests' and OS errors).
        """
        try:
            return call()
        except Exception as exc:
            # MLflow quotes the request URL, credentials included: redacted like the URI.
            message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
            raise ModelLoadError(
                f"MLflow registry {self.shown_uri}: {redact_uri(f'{what}: {message}')}"
            ) from None

    def _resolve(self, refs: Sequence[ModelRef]) -> Resolved:
        resolved: Resolved = []
        for ref in refs:
            if ref.alias:
                version = self._call(
                    f"cannot resolve alias '{ref.alias}' of registered model "
                    f"'{ref.registry_name}'",
                    partial(self._client.get_model_version_by_alias, ref.registry_name,
                            ref.alias),
                )
            else:
                version = self._call(
                    f"cannot find version {ref.version} of registered model "
                    f"'{ref.registry_name}'",
                    partial(self._client.get_model_version, ref.registry_name, ref.version),
                )
            if not str(version.version).isdigit():
                raise ModelLoadError(
                    f"MLflow registered model '{ref.registry_name}' ({ref}) answered version "
                    f"{str(version.version)[:32]!r}, not a version number"
                )
            if version.status != "READY":
                raise ModelLoadError(
                    f"MLflow registered model '{ref.registry_name}' version {version.version} "
                    f"({ref}) is {version.status}, not READY"
                )
            resolved.append((ref, version))
        return resolved

    # -- cache ---------------------------------------------------------------------------------

    def _materialise(self, model_dir: Path, version: ModelVersion) -> None:
        """Make ``model_dir/<version>`` hold the version's files and an up-to-date card,
        reusing a cached or stashed copy of the same registry version."""
        card = self._card(version)
        final = model_dir / version.version
        stashed = model_dir / STASH_DIR / version.version
        if not _holds(final, card):
            if _holds(stashed, card):
                _replace_dir(stashed, final)
            else:
                tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=model_dir))
                try:
                    self._download(version, tmp)
                    _write_card(tmp, card)
                    _replace_dir(tmp, final)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
        _write_card(final, card)

    def _download(self, version: ModelVersion, into: Path) -> None:
        """The ONNX file (as model.onnx) with the files beside it (external weights), and the
        version's config.pbtxt wherever it sits in the artifact tree; without an ONNX file,
        the MLflow model's directory tree."""
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        what = f"registered model '{version.name}' version {version.version}"
        uri = self._call(
            f"cannot locate the artifacts of {what}",
            lambda: self._client.get_model_version_download_uri(version.name, version.version),
        )
        shown = redact_uri(uri)
        repo = self._call(f"cannot open the artifacts of {what} at {shown}",
                          lambda: get_artifact_repository(uri, tracking_uri=self.tracking_uri))
        sizes = self._call(f"cannot list the artifacts of {what} at {shown}",
                           lambda: _artifact_files(repo))
        files = list(sizes)
        onnx = _pick_onnx(files, what, shown)
        wanted = _onnx_files(files, onnx) if onnx is not None else _mlflow_model_files(files)
        if wanted is None:
            raise ModelLoadError(f"{what} has no .onnx artifact and no MLflow model (an "
                                 f"{config_io.MLMODEL_FILE} file) at {shown} (found: "
                                 f"{', '.join(files[:10]) or 'nothing'})")
        for path in wanted:
            _check_artifact_path(path, what)
        _check_size(sum(sizes[path] or 0 for path in wanted), what, "listed")
        staging = into / ".files"
        staging.mkdir()
        received = 0
        for path, local in wanted.items():
            downloaded = self._call(f"cannot download '{path}' of {what}",
                                    partial(repo.download_artifacts, path, str(staging)))
            received += os.path.getsize(downloaded)
            _check_size(received, what, "downloaded")
            (into / local).parent.mkdir(parents=True, exist_ok=True)
            os.replace(downloaded, into / local)
        shutil.rmtree(staging, ignore_errors=True)

    def _card(self, version: ModelVersion) -> dict[str, Any]:
        """The model card: registry and run metadata under ``mlflow`` (``card.mlflow.*``)."""
        registry = {
            "name": version.name,
            "version": version.version,
            "aliases": sorted(version.aliases),
            "source": version.source,
            "run_id": version.run_id or "",
            "created": _iso(version.creation_timestamp),
            "description": version.description or "",
            "tags": dict(version.tags),
        }
        card: dict[str, Any] = {"tracking_uri": self.shown_uri, "registry": registry}
        if version.run_id:
            card["run"] = self._run_card(version.run_id)
        return {"mlflow": card}

    def _run_card(self, run_id: str) -> dict[str, Any]:
        run = self._call(f"cannot read run {run_id}", lambda: self._client.get_run(run_id))
        tags = run.data.tags
        datasets = {
            item.dataset.name: {
                "digest": item.dataset.digest,
                "source_type": item.dataset.source_type,
                "context": next((t.value for t in item.tags if t.key == "mlflow.data.context"),
                                ""),
            }
            for item in (run.inputs.dataset_inputs if run.inputs else [])
        }
        return {
            "id": run_id,
            "name": run.info.run_name or "",
            "experiment_id": run.info.experiment_id,
            "params": dict(run.data.params),
            "metrics": dict(run.data.metrics),
            "tags": {k: v for k, v in tags.items() if not k.startswith("mlflow.")},
            "code_revision": tags.get("mlflow.source.git.commit", ""),
            "source_name": tags.get("mlflow.source.name", ""),
            "user": tags.get("mlflow.user", ""),
            "datasets": datasets,
        }


def _artifact_files(repo: ArtifactRepository) -> dict[str, int | None]:
    """Every file path of the artifact tree, breadth first, down to SEARCH_DEPTH, with its
    size as listed (None when the store does not say)."""
    files: dict[str, int | None] = {}
    folders: list[str | None] = [None]
    for _ in range(SEARCH_DEPTH + 1):
        below: list[str | None] = []
        for folder in folders:
            for info in repo.list_artifacts(folder):
                if info.is_dir:
                    below.append(info.path)
                else:
                    files[info.path] = info.file_size
        folders = below
    return files


def _check_artifact_path(path: str, what: str) -> None:
    """Every part of an artifact's path is a plain name: the download writes it locally."""
    for part in path.split("/"):
        try:
            check_name(part, "artifact name")
        except InvalidInput as exc:
            raise ModelLoadError(f"{what}: artifact {path[:256]!r} cannot be downloaded: "
                                 f"{exc.message}") from None


def _check_size(total: int, what: str, how: str) -> None:
    if total > MAX_DOWNLOAD_BYTES:
        raise ModelLoadError(f"{what}: its files weigh more than the download limit of "
                             f"{MAX_DOWNLOAD_BYTES >> 20} MiB ({total >> 20} MiB {how})")


def _pick_onnx(files: Sequence[str], what: str, uri: str) -> str | None:
    """The shallowest ``model.onnx``, else the only ``.onnx`` file (logged with mlflow.onnx or
    as a plain artifact); None when there is none."""
    candidates = [p for p in files if p.lower().endswith(".onnx")]
    named = [p for p in candidates if p.rpartition("/")[2] == MODEL_FILE]
    if named:
        return min(named, key=lambda p: p.count("/"))
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    raise ModelLoadError(f"{what} has several .onnx artifacts ({', '.join(candidates)}); "
                         f"name the one to serve '{MODEL_FILE}'")


def _onnx_files(files: Sequence[str], onnx: str) -> dict[str, str]:
    """Artifact path -> local name: the ONNX file as model.onnx, the files beside it
    (external weights), and the shallowest config.pbtxt."""
    folder, _, _ = onnx.rpartition("/")
    wanted = {onnx: MODEL_FILE}
    for path in files:
        parent, _, local = path.rpartition("/")
        if parent == folder and local not in (MODEL_FILE, CARD_FILE) \
                and not local.lower().endswith(".onnx"):
            wanted[path] = local
    configs = [p for p in files if p.rpartition("/")[2] == config_io.CONFIG_FILE]
    if configs and config_io.CONFIG_FILE not in wanted.values():
        wanted[min(configs, key=lambda p: p.count("/"))] = config_io.CONFIG_FILE
    return wanted


def _mlflow_model_files(files: Sequence[str]) -> dict[str, str] | None:
    """Artifact path -> local path: the MLflow model (pyfunc) whose MLmodel file is shallowest,
    every file of its directory tree kept where it is relative to the MLmodel file (its
    flavour loads them from there); None without an MLmodel file."""
    mlmodels = [p for p in files if p.rpartition("/")[2] == config_io.MLMODEL_FILE]
    if not mlmodels:
        return None
    folder = min(mlmodels, key=lambda p: p.count("/")).rpartition("/")[0]
    prefix = f"{folder}/" if folder else ""
    return {path: path[len(prefix):] for path in files
            if path.startswith(prefix) and path[len(prefix):] != CARD_FILE}


def _identity(card: dict[str, Any]) -> tuple[str, ...]:
    """What makes two cached copies the same registry version (sources may share a cache)."""
    mlflow = card.get("mlflow", {})
    registry = mlflow.get("registry", {})
    return (mlflow.get("tracking_uri"), registry.get("name"), registry.get("version"),
            registry.get("source"), registry.get("run_id"))


def _holds(version_dir: Path, card: dict[str, Any]) -> bool:
    """True when ``version_dir`` is a complete download of the version ``card`` describes."""
    try:
        cached = json.loads((version_dir / CARD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    has_model = (version_dir / MODEL_FILE).is_file() \
        or (version_dir / config_io.MLMODEL_FILE).is_file()
    return has_model and isinstance(cached, dict) and _identity(cached) == _identity(card)


def _card_text(card: dict[str, Any]) -> str:
    return json.dumps(card, indent=2, sort_keys=True) + "\n"


def _write_if_changed(path: Path, text: str) -> None:
    """Atomic, and only when the content differs: the manager reloads a version whose files
    change, so an unchanged card must keep its modification time."""
    try:
        if path.read_text(encoding="utf-8") == text:
            return
    except (OSError, UnicodeDecodeError):
        pass
    write_atomically(path, text, durable=False)


def _write_card(version_dir: Path, card: dict[str, Any]) -> None:
    _write_if_changed(version_dir / CARD_FILE, _card_text(card))


def _write_config(model_dir: Path, served_name: str, versions: Sequence[str]) -> None:
    """config.pbtxt from the newest version that brings one, named after the served model and
    serving every version in the directory (the registry refs chose them, not a version
    policy). Left out when no version brings one and only one is served: auto-complete."""
    path = model_dir / config_io.CONFIG_FILE
    sources = [v for v in versions if (model_dir / v / config_io.CONFIG_FILE).is_file()]
    if not sources and len(versions) <= 1:
        path.unlink(missing_ok=True)
        return
    config = config_io.read_config(model_dir / sources[-1]) if sources else mc.ModelConfig()
    config.name = served_name
    config.version_policy.all.SetInParent()
    _write_if_changed(path, text_format.MessageToString(config))


def _replace_dir(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target``, moving an existing ``target`` out of the way first."""
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=".download-old-", dir=target.parent))
        target.rename(old / "v")
        shutil.rmtree(old, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    source.rename(target)


def _stash_others(model_dir: Path, keep: set[str]) -> None:
    """Move the version directories no reference resolves to into the stash, and prune it."""
    stash = model_dir / STASH_DIR
    for entry in model_dir.iterdir():
        if entry.is_dir() and entry.name.isdigit() and entry.name not in keep:
            _replace_dir(entry, stash / entry.name)
            os.utime(stash / entry.name)
    if stash.is_dir():
        stashed = sorted(stash.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in stashed[STASH_KEEP:]:
            shutil.rmtree(old, ignore_errors=True)


def _iso(timestamp_ms: int | None) -> str:
    if not timestamp_ms:
        return ""
    return datetime.fromtimestamp(timestamp_ms / 1000, UTC).isoformat()
