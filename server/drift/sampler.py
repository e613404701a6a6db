"""The hot-path half of drift monitoring: decide, copy, push into the version's ring.

Runs on the event loop thread, after a successful response. The cost per request is a dict
lookup and a flag check for a model without drift, and a rate decision, a copy of the small
input/output arrays, their size and a ring push for a sampled one. Nothing here blocks, logs
per request or touches the disk: the analyser thread does everything else.
"""

from __future__ import annotations

import random
import zlib
from typing import NamedTuple

from server.drift import options as drift_config
from server.drift.options import DriftConfig, Sampling
from server.drift.ring import SampleRing
from server.footprint import arrays_bytes
from server.interfaces import DriftSample
from server.spec import ModelSpec
from server.types import Array, InferRequest, InferResponse

_HASH_SPACE = 1 << 32


class CapturedSample(NamedTuple):
    """Private copies of one sampled request's tensors (the caller may reuse its buffers)."""

    request_id: str
    inputs: dict[str, Array]
    outputs: dict[str, Array]


class VersionSampler:
    """The sampler of one model version (one loaded spec of it).

    ``active`` starts False and is flipped by the analyser once it holds the version's
    reference profile; until then offers are counted in ``unprofiled`` and dropped.
    """

    __slots__ = (
        "_inputs", "_outputs", "_random", "_threshold", "active", "config", "model", "ring",
        "spec", "unprofiled", "version",
    )

    def __init__(self, spec: ModelSpec, version: str, config: DriftConfig) -> None:
        self.spec = spec
        self.model = spec.name
        self.version = version
        self.config = config
        self.ring: SampleRing[CapturedSample] = SampleRing(
            config.ring_size if config.enabled else 1, config.ring_max_bytes
        )
        self.active = False
        self.unprofiled = 0
        self._threshold = int(config.sample_rate * _HASH_SPACE)
        self._random = random.Random().random
        self._inputs: frozenset[str] = frozenset()
        self._outputs: frozenset[str] = frozenset()

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    def activate(self, inputs: frozenset[str], outputs: frozenset[str]) -> None:
        """Called by the analyser: start copying these tensors."""
        self._inputs = inputs
        self._outputs = outputs
        self.active = True

    def chosen(self, request_id: str) -> bool:
        """The sampling decision: random, or a stable hash of the request id."""
        if self._threshold >= _HASH_SPACE:
            return True
        if request_id and self.config.sampling is Sampling.REQUEST_ID:
            return zlib.crc32(request_id.encode()) < self._threshold
        return self._random() * _HASH_SPACE < self._threshold

    def take(self, request: InferRequest, response: InferResponse) -> bool:
        if not self.active:
            if self.config.enabled:
                self.unprofiled += 1
            return False
        if not self.chosen(request.id):
            return False
        wanted_in = self._inputs
        wanted_out = self._outputs
        inputs = {name: value.copy() for name, value in request.inputs.items()
                  if name in wanted_in}
        # An output answered as its classes (Triton's classification extension) is not the
        # tensor the profile describes: left out, as an output the client did not ask for.
        if request.classification:
            wanted_out = wanted_out - request.classification.keys()
        # Raw output bytes are immutable: a view over them is already a private copy.
        outputs = {out.name: out.data if out.raw is not None else out.data.copy()
                   for out in response.outputs if out.name in wanted_out}
        size = arrays_bytes(inputs.values()) + arrays_bytes(outputs.values())
        return self.ring.push(CapturedSample(request.id, inputs, outputs), size)


class DriftSampler:
    """The DriftSink: routes every offered sample to the sampler of its model version.

    Versions are registered on first sight (a hot-swapped version or a reloaded config brings
    a new spec object, which re-registers), on the loop thread, and dropped when the
    repository no longer serves them (``retain``). The table is replaced, never mutated, so
    the analyser thread can iterate a snapshot of it without a lock.
    """

    def __init__(self) -> None:
        self._versions: dict[tuple[str, str], VersionSampler] = {}
        #: The versions the repository serves (None: not told yet, every one is taken).
        self._served: frozenset[tuple[str, str]] | None = None

    def offer(self, sample: DriftSample) -> bool:
        model = sample.model
        spec = model.spec
        key = (spec.name, model.version)
        sampler = self._versions.get(key)
        if sampler is None or sampler.spec is not spec:
            if self._served is not None and key not in self._served:
                return False  # answered by a version retired since: not registered again
            sampler = self._register(spec, model.version)
        return sampler.take(sample.request, sample.response)

    def retain(self, served: frozenset[tuple[str, str]]) -> None:
        """Keep only the samplers of these (model, version) pairs: the repository's served
        versions after each change. The analyser then drops the others' state and gauges."""
        self._served = served
        if any(key not in served for key in self._versions):
            self._versions = {k: v for k, v in self._versions.items() if k in served}

    def samplers(self) -> list[VersionSampler]:
        """A snapshot of the drift-enabled versions; safe from any thread."""
        return [s for s in self._versions.values() if s.enabled]

    def register(self, spec: ModelSpec, version: str) -> VersionSampler:
        """Register ahead of traffic (the app does so for versions loaded at start)."""
        found = self._versions.get((spec.name, version))
        if found is not None and found.spec is spec:
            return found
        return self._register(spec, version)

    def _register(self, spec: ModelSpec, version: str) -> VersionSampler:
        # The repository checked the drift parameters when the model loaded.
        sampler = VersionSampler(spec, version, drift_config.parse(spec.parameters, spec.name))
        table = dict(self._versions)
        table[(spec.name, version)] = sampler
        self._versions = table
        return sampler
