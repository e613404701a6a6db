"""Score one input file chunk by chunk into the sink, resuming a run the sink remembers.

A chunk (``chunk_rows`` rows) is cut into requests of ``batch_size`` rows each (one row per
request for a model without batching). A version with one instance (``runs_direct``) runs
the chunk's requests as batches one after another on its instance's thread in one hop
(DynamicBatcher.run_alone: the same executor, packing and preprocessing, without the queue
whose hop to that thread and back per batch cost as much as a 64-row MLP batch runs);
otherwise they go to the data plane a few at a time so every instance always has the next
request queued. The chunk's outputs go to the writer thread, which
writes the chunk's predictions and its mark in one transaction while the next chunk is
scored. At most two chunks wait for the writer. A write the database refuses stops the run
with its reason; the chunks written before it stay, and a rerun scores the rest.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import math
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from server.batch.progress import Progress
from server.batch.sink import Sink
from server.batch.table import InputTable, read
from server.spec import ModelSpec
from server.types import Array, InferRequest, InferResponse

#: Requests in flight per model instance: one running, one queued behind it.
IN_FLIGHT_PER_INSTANCE = 2
#: Chunks scored but not yet written.
WRITE_AHEAD = 2


class Scorer(Protocol):
    """A model served without a transport (server.app.OfflineModel)."""

    spec: ModelSpec
    version: str

    def submit(self, request: InferRequest) -> asyncio.Future[InferResponse]: ...

    @property
    def runs_direct(self) -> bool: ...

    async def run_batches(self, requests: Sequence[InferRequest]) -> list[InferResponse]: ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Options:
    batch_size: int
    chunk_rows: int
    id_column: str = "id"
    progress: bool = True


@dataclass(frozen=True, slots=True)
class Outcome:
    run_id: int
    rows: int
    #: Rows scored by this call (0 when the file was already scored).
    scored: int
    seconds: float
    already_done: bool

    @property
    def rows_per_second(self) -> float:
        return self.scored / self.seconds if self.seconds > 0 else 0.0


def check_options(spec: ModelSpec, options: Options) -> None:
    if options.batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    if spec.batches and options.batch_size > spec.max_batch_size:
        raise ValueError(f"--batch-size {options.batch_size} is above model '{spec.name}''s "
                         f"max_batch_size {spec.max_batch_size}")
    if options.chunk_rows < 1:
        raise ValueError("--chunk-rows must be at least 1")


def digest(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as src:
        for block in iter(lambda: src.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


async def score_file(scorer: Scorer, sink: Sink, path: Path, options: Options) -> Outcome:
    spec = scorer.spec
    check_options(spec, options)
    table = await asyncio.to_thread(read, path, spec, options.id_column)
    file_digest = await asyncio.to_thread(digest, path)
    run = sink.find_run(file_digest, scorer.version)
    if run is None:
        run = sink.start_run(file_digest, str(path), scorer.version, options.chunk_rows,
                             table.rows)
    if run.finished:
        return Outcome(run.run_id, table.rows, 0, 0.0, True)
    chunk_rows = run.chunk_rows  # a resumed run keeps its chunks
    todo = [c for c in range(math.ceil(table.rows / chunk_rows)) if c not in run.done]
    done_rows = table.rows - sum(_chunk_size(table, c, chunk_rows) for c in todo)
    progress = Progress(table.rows, done_rows, path.name) if options.progress else None
    writes: deque[concurrent.futures.Future[None]] = deque()
    start = time.perf_counter()
    scored = 0
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="batch-write") as writer:
        try:
            for chunk in todo:
                first = chunk * chunk_rows
                last = min(first + chunk_rows, table.rows)
                outputs, version = await _score_rows(scorer, table.inputs, first, last,
                                                     options.batch_size)
                while len(writes) >= WRITE_AHEAD or (writes and writes[0].done()):
                    await asyncio.wrap_future(writes.popleft())  # raises a refused write
                writes.append(writer.submit(sink.write_chunk, run.run_id, chunk, version,
                                            table.ids[first:last], outputs))
                scored += last - first
                if progress is not None:
                    progress.update(last - first)
            while writes:
                await asyncio.wrap_future(writes.popleft())
        finally:
            for pending in writes:  # a refused write: the ones after it never start
                pending.cancel()
            if progress is not None:
                progress.close()
    seconds = time.perf_counter() - start
    sink.finish_run(run.run_id)
    return Outcome(run.run_id, table.rows, scored, seconds, False)


def _chunk_size(table: InputTable, chunk: int, chunk_rows: int) -> int:
    return min(chunk_rows, table.rows - chunk * chunk_rows)


async def _score_rows(scorer: Scorer, inputs: Mapping[str, Array], first: int, last: int,
                      batch_size: int) -> tuple[dict[str, Array], str]:
    """Rows [first, last) through the version's executor (or the data plane), in order; their
    outputs and the version that answered."""
    spec = scorer.spec
    types = {t.name: t.datatype for t in spec.client_inputs}
    window = IN_FLIGHT_PER_INSTANCE * max(1, spec.instance_count)
    step = batch_size if spec.batches else 1
    in_flight: deque[asyncio.Future[InferResponse]] = deque()
    parts: dict[str, list[Array]] = {}
    version = scorer.version

    def collect(response: InferResponse) -> None:
        nonlocal version
        version = response.model_version
        for output in response.outputs:
            data = output.data
            parts.setdefault(output.name, []).append(
                data if spec.batches else data[np.newaxis])

    requests = []
    for begin in range(first, last, step):
        if spec.batches:
            end = min(begin + step, last)
            request_inputs = {name: value[begin:end] for name, value in inputs.items()}
        else:
            request_inputs = {name: value[begin] for name, value in inputs.items()}
        requests.append(InferRequest(spec.name, scorer.version, str(begin), request_inputs,
                                     {name: types[name] for name in request_inputs}))
    if scorer.runs_direct:
        for response in await scorer.run_batches(requests):
            collect(response)
    else:
        for request in requests:
            in_flight.append(scorer.submit(request))
            if len(in_flight) >= window:
                collect(await in_flight.popleft())
        while in_flight:
            collect(await in_flight.popleft())
    return {name: np.concatenate(values) for name, values in parts.items()}, version
