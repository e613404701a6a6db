"""``peregrine optimize --rollout``: a new version through a running server, shadow first,
then a guarded canary, over the PeregrineAdmin calls ``peregrine route`` makes.

The new version must be served beside the source: a polling server picks it up at its next
poll, an explicit one is asked to load the model again (RepositoryModelLoad), and the model's
version policy must keep both (``all`` or ``specific``, or ``latest`` of 2 or more).

A rollout that stops (agreement short, a guard rail broken, a phase out of time) leaves a
table that sends all the model's traffic to the source, never a cleared one: without a table
unversioned requests go to the highest ready version, the candidate.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import grpc
import numpy as np

from server._pb import admin_pb2 as admin
from server._pb import admin_pb2_grpc as admin_grpc
from server._pb import grpc_service_pb2 as pb
from server._pb import grpc_service_pb2_grpc as pb_grpc
from server.cli.connection import Metadata
from server.cli.route import format_status
from server.spec import ModelSpec
from server.types import Array

SOURCE, CANDIDATE = "source", "candidate"
ENDED = ("promoted", "rolled_back", "failed")


@dataclass(frozen=True, slots=True)
class Plan:
    model: str
    source: str
    candidate: str
    #: Shadow comparisons to wait for before judging agreement.
    comparisons: int
    min_agreement: float
    #: Largest relative difference of float outputs allowed in the shadow (None: not judged).
    max_rel_error: float | None
    #: The canary's steps and guard rails (baseline and candidate are filled in here).
    canary: admin.Canary
    #: Seconds each phase (loading, shadow, canary) may take.
    timeout: float
    poll_secs: float = 0.2


@dataclass(frozen=True, slots=True)
class Outcome:
    ok: bool
    reason: str


class Rollout:
    def __init__(self, channel: grpc.Channel, metadata: Metadata, rpc_timeout: float,
                 say: Callable[[str], None]) -> None:
        self._admin = admin_grpc.PeregrineAdminStub(channel)
        self._infer = pb_grpc.GRPCInferenceServiceStub(channel)
        self._metadata = metadata
        self._rpc_timeout = rpc_timeout
        self._say = say

    def run(self, plan: Plan) -> Outcome:
        loaded = self._wait_served(plan)
        if loaded is not None:
            return loaded
        shadowed = self._shadow(plan)
        if shadowed is not None:
            return shadowed
        return self._canary(plan)

    # -- the phases --------------------------------------------------------------------------

    def _ready(self, model: str, version: str) -> bool:
        try:
            return bool(self._infer.ModelReady(
                pb.ModelReadyRequest(name=model, version=version), timeout=self._rpc_timeout,
                metadata=self._metadata).ready)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return False
            raise

    def _wait_served(self, plan: Plan) -> Outcome | None:
        if not self._ready(plan.model, plan.candidate):
            try:  # an explicit-mode server loads the new version now; poll mode refuses
                self._infer.RepositoryModelLoad(
                    pb.RepositoryModelLoadRequest(model_name=plan.model),
                    timeout=plan.timeout, metadata=self._metadata)
                self._say(f"asked the server to load '{plan.model}' again")
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                    raise
        deadline = time.monotonic() + plan.timeout
        while not self._ready(plan.model, plan.candidate):
            if time.monotonic() > deadline:
                return Outcome(False, f"version {plan.candidate} of '{plan.model}' was not "
                               f"served within {plan.timeout:g} s (a server polls the "
                               "repository or loads explicitly; see the server's log)")
            time.sleep(plan.poll_secs)
        if not self._ready(plan.model, plan.source):
            return Outcome(False, f"version {plan.source} is not served beside version "
                           f"{plan.candidate}: the model's version_policy must keep both")
        self._say(f"version {plan.candidate} is served beside version {plan.source}")
        return None

    def _set(self, table: admin.RouteTable) -> admin.RouteStatus:
        status: admin.RouteStatus = self._admin.SetRoute(
            admin.SetRouteRequest(table=table), timeout=self._rpc_timeout,
            metadata=self._metadata)
        return status

    def _get(self, model: str) -> admin.RouteStatus:
        status: admin.RouteStatus = self._admin.GetRoute(
            admin.RouteRequest(model=model), timeout=self._rpc_timeout,
            metadata=self._metadata)
        return status

    def _keep_source(self, plan: Plan) -> None:
        """A table that sends all traffic to the source. Not a cleared table: without one,
        unversioned requests go to the highest ready version, which is the candidate."""
        self._set(admin.RouteTable(
            model=plan.model,
            variants=[admin.Variant(name=SOURCE, version=plan.source, weight=100)]))

    def _shadow(self, plan: Plan) -> Outcome | None:
        table = admin.RouteTable(
            model=plan.model,
            variants=[admin.Variant(name=SOURCE, version=plan.source, weight=100)],
            shadow=admin.Shadow(target=admin.Variant(name=CANDIDATE, version=plan.candidate),
                                fraction=1.0),
        )
        self._set(table)
        self._say(f"shadowing version {plan.candidate} against version {plan.source}: "
                  f"waiting for {plan.comparisons} comparisons")
        deadline = time.monotonic() + plan.timeout
        status = self._get(plan.model)
        while status.shadow.compared < plan.comparisons:
            if time.monotonic() > deadline:
                self._keep_source(plan)
                return Outcome(False, f"shadow: {status.shadow.compared} of "
                               f"{plan.comparisons} comparisons in {plan.timeout:g} s (is "
                               f"traffic reaching '{plan.model}'?); {_kept(plan)}")
            time.sleep(plan.poll_secs)
            status = self._get(plan.model)
        self._say(format_status(status))
        live = status.shadow
        problem = ""
        if live.agreement < plan.min_agreement:
            problem = (f"shadow agreement {live.agreement:.4f} is below "
                       f"{plan.min_agreement:g} over {live.compared} comparisons")
        elif plan.max_rel_error is not None and live.max_rel_diff > plan.max_rel_error:
            problem = (f"shadow relative difference {live.max_rel_diff:.6g} exceeds "
                       f"{plan.max_rel_error:g} over {live.compared} comparisons")
        if problem:
            self._keep_source(plan)
            return Outcome(False, f"{problem}; {_kept(plan)}")
        return None

    def _canary(self, plan: Plan) -> Outcome:
        canary = admin.Canary()
        canary.CopyFrom(plan.canary)
        canary.baseline, canary.candidate = SOURCE, CANDIDATE
        table = admin.RouteTable(
            model=plan.model,
            variants=[admin.Variant(name=SOURCE, version=plan.source, weight=100),
                      admin.Variant(name=CANDIDATE, version=plan.candidate, weight=0)],
            canary=canary,
        )
        self._set(table)
        self._say(f"canary from version {plan.source} to version {plan.candidate} started")
        step = -1
        deadline = time.monotonic() + plan.timeout
        status = self._get(plan.model)
        while status.canary_state not in ENDED:
            if status.canary_step != step:
                step = status.canary_step
                deadline = time.monotonic() + plan.timeout
                self._say(f"canary step {step + 1}: {status.canary_reason or 'running'}")
            if time.monotonic() > deadline:
                self._admin.Rollback(admin.RouteRequest(model=plan.model),
                                     timeout=self._rpc_timeout, metadata=self._metadata)
                return Outcome(False, f"canary step {step + 1} did not end within "
                               f"{plan.timeout:g} s; rolled back: {_kept(plan)}")
            time.sleep(plan.poll_secs)
            status = self._get(plan.model)
        self._say(format_status(status))
        if status.canary_state == "promoted":
            return Outcome(True, f"version {plan.candidate} serves all unversioned traffic "
                           f"of '{plan.model}'")
        if status.canary_state == "rolled_back":  # the server left the source at 100
            return Outcome(False, f"canary rolled back: {status.canary_reason}; "
                           f"{_kept(plan)}")
        self._keep_source(plan)
        return Outcome(False, f"canary {status.canary_state}: {status.canary_reason}; "
                       f"{_kept(plan)}")


def _kept(plan: Plan) -> str:
    return (f"the routing table sends all unversioned traffic of '{plan.model}' to version "
            f"{plan.source}")


class Replay:
    """Sends rows of a data set to the model, one request each, in a loop until stopped: the
    traffic a shadow and a canary judge, for a demonstration or a quiet server."""

    def __init__(self, channel: grpc.Channel, metadata: Metadata, spec: ModelSpec,
                 rows: Mapping[str, Array]) -> None:
        self._stub = pb_grpc.GRPCInferenceServiceStub(channel)
        self._metadata = metadata
        self._spec = spec
        self._rows = rows
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="optimize-replay", daemon=True)
        self.sent = 0
        self.failed = 0

    def __enter__(self) -> Replay:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _request(self, index: int) -> pb.ModelInferRequest:
        request = pb.ModelInferRequest(model_name=self._spec.name)
        for tensor in self._spec.inputs:
            row = np.ascontiguousarray(self._rows[tensor.name][index:index + 1])
            shape = row.shape if self._spec.batches else row.shape[1:]
            request.inputs.add(name=tensor.name, datatype=tensor.datatype.wire, shape=shape)
            request.raw_input_contents.append(row.tobytes())
        return request

    def _run(self) -> None:
        total = len(next(iter(self._rows.values())))
        requests = [self._request(i) for i in range(min(total, 256))]
        while not self._stop.is_set():
            try:
                self._stub.ModelInfer(requests[self.sent % len(requests)], timeout=10,
                                      metadata=self._metadata)
            except grpc.RpcError:
                self.failed += 1
            self.sent += 1
