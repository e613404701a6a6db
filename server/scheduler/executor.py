"""Runs one formed batch on one backend instance: pack -> execute -> check -> unpack.

The seam between batch formation (the batcher) and execution: called from an instance's
worker thread, or on the event loop for a batch the batcher predicts to be cheap. Knows
nothing of queues, futures or metrics; what a batch produced comes back as a BatchRun.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np

from server.classification import classify
from server.errors import BackendError, InvalidInput, PeregrineError, correlation_id
from server.interfaces import Backend, ModelPacker, RequestBackend
from server.spec import ModelSpec
from server.types import Array, Execution, InferRequest, InferResponse, OutputTensor

log = logging.getLogger(__name__)
_now = time.perf_counter_ns
_cpu = time.thread_time_ns


@dataclass(slots=True)
class BatchRun:
    """What running one batch produced: a response or the error that request alone raised,
    per request in order, or one error for the whole batch; and the backend calls made."""

    outcomes: list[InferResponse | Exception] = field(default_factory=list)
    error: Exception | None = None
    #: Every backend call that succeeded (several when a batch was retried request by request).
    executions: list[Execution] = field(default_factory=list)


class BatchExecutor:
    """The execution of one model version's batches. Thread-safe: holds no per-batch state."""

    def __init__(self, spec: ModelSpec, version: str, packer: ModelPacker | None) -> None:
        """``packer``: None for a version whose backend takes requests (a RequestBackend)."""
        self._spec = spec
        self._version = version
        self._packer = packer
        self._all_outputs = tuple(t.name for t in spec.outputs)
        #: (name, numpy dtype) of every declared output, for ``run_rows``.
        self._declared = tuple((t.name, t.datatype.numpy_dtype) for t in spec.outputs)

    def run(self, backend: Backend, requests: Sequence[InferRequest],
            rows: Sequence[int]) -> BatchRun:
        """Run a batch; when the backend refuses one request's data (BYTES that are not UTF-8,
        say), run the batch's requests one by one so that only the offending ones fail."""
        run = BatchRun()
        if self._packer is None:
            try:
                self._execute_requests(cast(RequestBackend, backend), requests, rows, run)
            except Exception as exc:
                run.error = exc
            return run
        try:
            self._execute(backend, requests, rows, run)
        except InvalidInput as exc:
            if len(requests) == 1:
                run.error = exc
                return run
            for request, count in zip(requests, rows, strict=True):
                try:
                    self._execute(backend, [request], [count], run)
                except Exception as alone:
                    run.outcomes.append(alone)
        except Exception as exc:
            run.error = exc
        return run

    def typed_error(self, exc: BaseException, requests: Sequence[InferRequest]) -> PeregrineError:
        """Typed errors pass through; anything else the backend raised becomes a BackendError
        that says which version failed, with a correlation id. The backend's own message (it
        may name files, or the runtime's internals) goes only to the log, with that id.

        ``exc``'s traceback is dropped (once logged): its frames ran the batch, so they hold
        the batch's requests and buffers, and :meth:`run`'s frame holds the BatchRun that
        holds ``exc``, a cycle that kept all of it in memory until the garbage collector
        next ran."""
        if isinstance(exc, PeregrineError):
            return exc.with_traceback(None)
        correlation = correlation_id()
        log.error(
            "backend failed",
            extra={"model": self._spec.name, "version": self._version,
                   "request_ids": ", ".join(repr(r.id) for r in requests),
                   "correlation_id": correlation, "error": repr(exc)},
            exc_info=exc,
        )
        exc.__traceback__ = None
        return BackendError(f"model '{self._spec.name}' version {self._version} failed to run "
                            f"the batch (correlation id {correlation})")

    def _execute(self, backend: Backend, requests: Sequence[InferRequest],
                 rows: Sequence[int], run: BatchRun) -> None:
        """Pack, execute, check, unpack; appends the call's timings and a response or error
        per request to ``run``."""
        assert self._packer is not None
        cpu0 = _cpu()
        t0 = _now()
        # The batch's buffers may be pooled: unpack (which copies) before the context exits.
        with self._packer.pack(requests, rows) as batch:
            t1 = _now()
            outputs = self._execute_checked(backend, batch, sum(rows))
            t2 = _now()
            per_request = self._packer.unpack(outputs, requests, rows)
        t3 = _now()
        run.executions.append(Execution(sum(rows), len(requests), t1 - t0, t2 - t1, t3 - t2,
                                        _cpu() - cpu0, t0))
        for request, tensors in zip(requests, per_request, strict=True):
            try:
                run.outcomes.append(self._response(
                    request, tensors, request.requested_outputs or self._all_outputs))
            except BackendError as exc:  # this request's failure, never the batch's
                run.outcomes.append(exc)

    def _execute_checked(self, backend: Backend, batch: Mapping[str, Array],
                         produced: int) -> dict[str, Array]:
        """The backend's outputs for a packed batch of ``produced`` rows, each output checked
        to have one row per input row (a batching model)."""
        outputs = backend.execute(batch)
        if self._spec.batches:
            for name, value in outputs.items():
                _check_rows(name, value, produced)
        return outputs

    @property
    def takes_rows(self) -> bool:
        """Whether ``run_rows`` may be used: the backend takes packed batches."""
        return self._packer is not None

    def run_rows(self, backend: Backend, inputs: Mapping[str, Array],
                 batch_size: int) -> dict[str, Array]:
        """Offline scoring (``peregrine batch``): the rows of ``inputs`` (whole arrays, rows
        first, already validated) run as batches of ``batch_size`` rows (one row at a time
        for a model without batching) through the same packing, preprocessing and backend
        call as ``run``, without requests, per-request responses or timings: each batch is a
        row slice of the arrays (no copy). Every declared output of every batch is checked
        (its rows, and one shape after them), and comes back as one array of every row in
        the spec's datatype (joined on this thread: joining on another thread, overlapped
        with the next batches, measured 25% slower, the two threads contending for the
        GIL). The first failure raises, typed."""
        assert self._packer is not None
        rows = len(next(iter(inputs.values())))
        batches = self._spec.batches
        step = batch_size if batches else 1
        execute = backend.execute
        # Without preprocessing a batch is its row slice as it is: no packing step at all
        # (measured: the per-batch packing context and checks cost about 10% of an MLP
        # batch of 64). A preprocessed batch is a pooled buffer: an output that views it (a
        # model returning its input) is copied before the buffer goes back.
        pack_rows = None if self._spec.preprocess is None else self._packer.pack_rows
        results: list[dict[str, Array]]
        try:
            if pack_rows is None and batches and len(inputs) == 1:
                # The usual case, as one comprehension: each batch a dict display of its one
                # input's row slice, straight to the backend.
                [(only, value)] = inputs.items()
                results = [execute({only: value[begin:begin + step]})
                           for begin in range(0, rows, step)]
            else:
                results = []
                for begin in range(0, rows, step):
                    part = {name: value[begin:begin + step] if batches else value[begin]
                            for name, value in inputs.items()}
                    if pack_rows is None:
                        results.append(execute(part))
                    else:
                        with pack_rows(part) as batch:
                            results.append({name: value.copy()
                                             for name, value in execute(batch).items()})
            return {name: _joined(_checked(self._spec.name, name, results,
                                           step if batches else 0, rows), dtype, batches)
                    for name, dtype in self._declared}
        except Exception as exc:
            raise self.typed_error(exc, []) from None

    def _execute_requests(self, backend: RequestBackend, requests: Sequence[InferRequest],
                          rows: Sequence[int], run: BatchRun) -> None:
        """The backend takes the requests as they are (no packing): each comes back with its
        outputs or its own error."""
        cpu0 = _cpu()
        t0 = _now()
        results = backend.execute_requests(requests)
        t1 = _now()
        for request, result in zip(requests, results, strict=True):
            if isinstance(result, PeregrineError):
                run.outcomes.append(result)
                continue
            try:
                run.outcomes.append(self._response(request, result, request.requested_outputs
                                                   or [n for n in self._all_outputs
                                                       if n in result]))
            except BackendError as exc:
                run.outcomes.append(exc)
        run.executions.append(Execution(sum(rows), len(requests), 0, t1 - t0, _now() - t1,
                                        _cpu() - cpu0))

    def _response(self, request: InferRequest, outputs: dict[str, OutputTensor],
                  names: Sequence[str]) -> InferResponse:
        try:
            tensors = [outputs[n] for n in names]
        except KeyError as missing:
            raise BackendError(f"model '{self._spec.name}' returned no output {missing}") \
                from None
        classes = request.classification
        if classes is not None:
            spec = self._spec
            tensors = [t if t.name not in classes else
                       classify(t, classes[t.name], spec.labels.get(t.name, ()), spec.batches)
                       for t in tensors]
        return InferResponse(
            model_name=self._spec.name,
            model_version=self._version,
            id=request.id,
            outputs=tensors,
        )


def _checked(model: str, name: str, results: Sequence[Mapping[str, Array]], step: int,
             rows: int) -> list[Array]:
    """Output ``name`` of every batch's ``results``, checked: ``step`` rows per batch (the
    last has the rest of ``rows``) and one shape after them, or, where ``step`` is 0 (a
    model without batching), one shape for every row. One comparison of lists checks them
    all; the failing batch is looked for only when it fails."""
    try:
        parts = [result[name] for result in results]
    except KeyError:
        raise BackendError(f"model '{model}' returned no output '{name}'") from None
    first = parts[0].shape
    if not step:
        for part in parts:
            if part.shape != first:
                raise BackendError(f"output '{name}' has shape {list(part.shape)} for one row "
                                   f"and {list(first)} for another")
        return parts
    last = rows - step * (len(parts) - 1)
    expected = [(step, *first[1:])] * (len(parts) - 1) + [(last, *first[1:])]
    if [part.shape for part in parts] != expected:
        for part, wanted in zip(parts, expected, strict=True):
            _check_rows(name, part, wanted[0])
            if part.shape != wanted:
                raise BackendError(f"output '{name}' has shape {list(part.shape)} in one "
                                   f"batch and {list(first)} in another")
    return parts


def _joined(parts: Sequence[Array], dtype: np.dtype[Any], batches: bool) -> Array:
    """One output's checked parts as one array of every row, in the spec's datatype (as
    unpack converts)."""
    if not batches:
        return np.stack(parts).astype(dtype, copy=False)
    return np.concatenate(parts, dtype=dtype, casting="unsafe")


def _check_rows(name: str, value: Array, rows: int) -> None:
    """Output ``name`` of a batch of ``rows`` rows must have one row per input row."""
    if value.ndim == 0 or value.shape[0] != rows:
        raise BackendError(f"output '{name}' has shape {list(value.shape)}; expected {rows} "
                           "rows for the batch")
