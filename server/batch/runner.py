"""Score one input file chunk by chunk into the sink, resuming a run the sink remembers.

A chunk (``chunk_rows`` rows) is cut into batches of ``batch_size`` rows each (one row at a
time for a model without batching). A version with one instance whose backend takes packed
batches (``runs_direct``) scores every chunk still to do on its instance's thread in one hop
(DynamicBatcher.run_rows): each batch a row slice of the file's arrays through the same
packing, preprocessing and backend call as a served batch, the file validated once (every
batch is a slice of the same arrays), the outputs kept as arrays, without the queue (whose
hop to that thread and back per batch cost as much as a 64-row MLP batch runs), requests or
per-request responses; that thread hands each scored chunk straight to the writer thread.
Otherwise the chunk's batches go to the data plane as requests a few at a time so every
instance always has the next request queued. The writer thread (``writer.ChunkWriter``)
writes a chunk's predictions and its mark in one transaction while the next chunks are
scored, at most two chunks behind. A write the database refuses stops the run with its
reason; the chunks written before it stay, and a rerun scores the rest.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from server.batch.progress import Progress
from server.batch.sink import Sink
from server.batch.table import InputTable, read
from server.batch.writer import ChunkWriter
from server.spec import ModelSpec
from server.types import Array, InferRequest, InferResponse

#: Requests in flight per model instance: one running, one queued behind it.
IN_FLIGHT_PER_INSTANCE = 2
#: Chunks scored but not yet written (the writer's queue).
WRITE_AHEAD = 2


class Scorer(Protocol):
    """A model served without a transport (server.app.OfflineModel)."""

    spec: ModelSpec
    version: str

    def submit(self, request: InferRequest) -> asyncio.Future[InferResponse]: ...

    @property
    def runs_direct(self) -> bool: ...

    async def score_chunks(self, inputs: Mapping[str, Array], spans: Sequence[tuple[int, int]],
                           batch_size: int, deliver: Callable[[dict[str, Array]], None]) -> None:
        ...

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
    spans = [(c * chunk_rows, c * chunk_rows + _chunk_size(table, c, chunk_rows))
             for c in todo]
    done_rows = table.rows - sum(last - first for first, last in spans)
    progress = Progress(table.rows, done_rows, path.name) if options.progress else None

    span_of = dict(zip(todo, spans, strict=True))

    def write(scored: tuple[int, str, dict[str, Array]]) -> None:
        chunk, version, outputs = scored
        first, last = span_of[chunk]
        sink.write_chunk(run.run_id, chunk, version, table.ids[first:last], outputs)
        if progress is not None:
            progress.update(last - first)

    writer: ChunkWriter[tuple[int, str, dict[str, Array]]] = ChunkWriter(write, WRITE_AHEAD)
    start = time.perf_counter()
    try:
        if scorer.runs_direct:
            chunks = iter(todo)
            await scorer.score_chunks(table.inputs, spans, options.batch_size,
                                      lambda outputs: writer.put(
                                          (next(chunks), scorer.version, outputs)))
        else:
            for chunk, (first, last) in zip(todo, spans, strict=True):
                outputs, version = await _score_rows(scorer, table.inputs, first, last,
                                                     options.batch_size)
                await asyncio.to_thread(writer.put, (chunk, version, outputs))
        await asyncio.to_thread(writer.close)
    except BaseException:
        await asyncio.shield(asyncio.to_thread(writer.abandon))
        raise
    finally:
        if progress is not None:
            progress.close()
    seconds = time.perf_counter() - start
    sink.finish_run(run.run_id)
    return Outcome(run.run_id, table.rows, table.rows - done_rows, seconds, False)


def _chunk_size(table: InputTable, chunk: int, chunk_rows: int) -> int:
    return min(chunk_rows, table.rows - chunk * chunk_rows)


async def _score_rows(scorer: Scorer, inputs: Mapping[str, Array], first: int, last: int,
                      batch_size: int) -> tuple[dict[str, Array], str]:
    """Rows [first, last) through the data plane as requests, in order; their outputs and
    the version that answered."""
    rows = {name: value[first:last] for name, value in inputs.items()}  # views, no copy
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

    for begin in range(0, last - first, step):
        if spec.batches:
            request_inputs = {name: value[begin:begin + step] for name, value in rows.items()}
        else:
            request_inputs = {name: value[begin] for name, value in rows.items()}
        in_flight.append(scorer.submit(InferRequest(
            spec.name, scorer.version, str(first + begin), request_inputs,
            {name: types[name] for name in request_inputs})))
        if len(in_flight) >= window:
            collect(await in_flight.popleft())
    while in_flight:
        collect(await in_flight.popleft())
    return {name: np.concatenate(values) for name, values in parts.items()}, version
