"""The background half of drift monitoring: one thread, off the event loop.

Every ``interval`` seconds it drains each drift-enabled version's ring, turns the samples into
feature rows, feeds the sliding and fixed windows, evaluates them against the version's
reference profile, sets the gauges, logs level changes and writes completed fixed windows to
the sample store, and asks the retrain hook (server/drift/retrain.py) whether a run is due.
It loads a version's profile on first sight (and retries while there is
none, so profiling a live version needs no restart) and only then lets its sampler copy.
An error in one version is logged once and does not stop the others or the thread.

The thread is supervised: a pass that raises out of the loop ends the thread, which logs why
and starts its successor (after a pause that doubles while passes keep failing, up to a
minute). ``heartbeat`` (the wall-clock end of the last completed pass) is exported, so an
analyser that stalls or keeps dying shows as a heartbeat that stops moving.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from server.drift import profile as profiles
from server.drift.detect import Level, WindowReport, evaluate
from server.drift.features import Kind, Role, TensorLayout, layouts
from server.drift.profile import ReferenceProfile
from server.drift.retrain import RetrainHook
from server.drift.sampler import DriftSampler, VersionSampler
from server.drift.store import SampleStore
from server.drift.window import Block, Windows, assemble

log = logging.getLogger(__name__)

SLIDING = "sliding"
FIXED = "fixed"
#: The longest pause before a dead analyser thread's successor starts.
MAX_RESTART_PAUSE = 60.0


class DriftGauges(Protocol):
    """Where results go (server.metrics.drift.DriftMetrics in the server)."""

    def set_feature(
        self, model: str, version: str, window: str, feature: str, *, psi: float,
        ks_pvalue: float, chi2_pvalue: float, js: float, missing_rate: float,
        out_of_range: float, level: int,
    ) -> None: ...

    def set_model(self, model: str, version: str, window: str, *, score: float, level: int,
                  rows: int) -> None: ...

    def forget(self, model: str, version: str) -> None:
        """Drop the gauges of a version no longer monitored."""
        ...


@dataclass(slots=True)
class _VersionState:
    sampler: VersionSampler
    profile: ReferenceProfile | None = None
    layouts: list[TensorLayout] = field(default_factory=list)
    widths: dict[str, int] = field(default_factory=dict)
    windows: Windows | None = None
    store: SampleStore | None = None
    retry_at: float = 0.0
    announced_missing: bool = False
    level: Level = Level.OK
    sequence: int = 0
    sliding_rows_seen: int = 0
    sliding_at: float = 0.0
    mismatched: int = 0
    last_error: str = ""
    latest: dict[str, WindowReport] = field(default_factory=dict)


class DriftAnalyser:
    def __init__(
        self,
        sampler: DriftSampler,
        repository: Path,
        gauges: DriftGauges | None = None,
        interval: float = 0.25,
        sliding_every: float = 2.0,
        profile_retry: float = 10.0,
        retrain: RetrainHook | None = None,
    ) -> None:
        self._sampler = sampler
        self._repository = repository
        self._gauges = gauges
        self._interval = interval
        self._sliding_every = sliding_every
        self._profile_retry = profile_retry
        self._retrain = retrain
        self._states: dict[VersionSampler, _VersionState] = {}
        #: CPU seconds this analyser has used (its whole cost, as the hot path's is measured
        #: apart): exported as peregrine_drift_analyser_cpu_seconds_total.
        self.cpu_seconds = 0.0
        #: Wall-clock time (s since the epoch) a pass last completed; 0 before the first.
        #: Exported as peregrine_drift_analyser_heartbeat_timestamp_seconds.
        self.heartbeat = 0.0
        #: Threads started after one died (peregrine_drift_analyser_restarts_total).
        self.restarts = 0
        self._pause = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self._spawn()

    def _spawn(self) -> None:
        thread = threading.Thread(target=self._run, name="drift-analyser", daemon=True)
        self._thread = thread  # before it runs: stop() joins whichever thread is current
        thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread after a last pass; the partial fixed windows go to the store."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        while (thread := self._thread) is not None:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.error("drift analyser did not stop in time", extra={"timeout_s": timeout})
                return
            if self._thread is thread:  # else it died and started a successor: join that
                self._thread = None

    def _run(self) -> None:
        _lower_own_priority()
        try:
            while not self._stop.wait(self._pause):
                self._timed(self.run_once)
                self._pause = self._interval
        except Exception as exc:
            if not self._stop.is_set():
                self.restarts += 1
                self._pause = min(self._pause * 2, MAX_RESTART_PAUSE)
                log.exception("drift analyser thread died; restarted", extra={
                    "error": repr(exc), "restarts": self.restarts, "pause_s": self._pause,
                })
                self._spawn()
                return
            log.exception("drift analyser failed while stopping", extra={"error": repr(exc)})
        for step in (self.run_once, self.flush):  # a last pass, then the partial windows
            try:
                self._timed(step)
            except Exception as exc:  # stopping goes on regardless
                log.exception("drift analyser failed while stopping", extra={"error": repr(exc)})

    def _timed(self, step: Callable[[], object]) -> None:
        started = time.thread_time()
        try:
            step()
        finally:
            self.cpu_seconds += time.thread_time() - started

    # -- one pass --------------------------------------------------------------------------------

    def run_once(self, now: float | None = None) -> list[WindowReport]:
        """Drain and evaluate every version once; returns the reports it produced."""
        now = time.monotonic() if now is None else now
        live = self._sampler.samplers()
        for gone in [s for s in self._states if s not in live]:
            del self._states[gone]
            if self._gauges is not None and not any(
                (s.model, s.version) == (gone.model, gone.version) for s in live
            ):
                self._gauges.forget(gone.model, gone.version)
            if self._retrain is not None:
                self._retrain.forget(gone.model, gone.version)
        produced: list[WindowReport] = []
        for sampler in live:
            state = self._states.get(sampler)
            if state is None:
                state = self._states[sampler] = _VersionState(sampler)
            try:
                produced += self._pass(state, now)
                self._consider_retraining(state, now)
            except Exception as exc:
                message = repr(exc)
                if message != state.last_error:
                    state.last_error = message
                    log.exception("drift analysis failed", extra={
                        "model": sampler.model, "version": sampler.version, "error": message,
                    })
        self.heartbeat = time.time()
        return produced

    def _pass(self, state: _VersionState, now: float) -> list[WindowReport]:
        if state.profile is None and not self._load_profile(state, now):
            return []
        assert state.profile is not None and state.windows is not None
        sampler = state.sampler
        samples = sampler.ring.drain()
        produced: list[WindowReport] = []
        if samples:
            assembly = assemble(samples, state.layouts, state.widths)
            state.mismatched += assembly.mismatched
            closed = [self._fixed(state, block, partial=False)
                      for block in state.windows.add(assembly.block)]
            produced += closed
            if closed:
                # The newest fixed window holds (nearly) the last window's rows: it stands in
                # for the sliding window, so busy traffic does not pay for both.
                self._publish(state, dataclasses.replace(closed[-1], window=SLIDING))
                state.sliding_rows_seen = state.windows.total_rows
                state.sliding_at = now
        windows = state.windows
        config = sampler.config
        if (
            windows.total_rows > state.sliding_rows_seen
            and windows.sliding.rows >= config.min_rows
            and now - state.sliding_at >= self._sliding_every
        ):
            state.sliding_rows_seen = windows.total_rows
            state.sliding_at = now
            report = evaluate(state.profile, windows.sliding, config.thresholds, SLIDING,
                              state.sequence)
            self._publish(state, report)
            produced.append(report)
        return produced

    def _consider_retraining(self, state: _VersionState, now: float) -> None:
        """Every pass (not only when a window closes), so a version that stays at alert is
        retrained again once the cool-down has passed."""
        report = state.latest.get(FIXED)
        if self._retrain is None or report is None or state.windows is None:
            return
        store = state.store
        self._retrain.consider(report, state.windows.total_rows,
                               store.directory if store is not None else None,
                               store.format if store is not None else "", now)

    def _fixed(self, state: _VersionState, block: Block, partial: bool) -> WindowReport:
        assert state.profile is not None
        sampler = state.sampler
        report = evaluate(state.profile, block, sampler.config.thresholds, FIXED, state.sequence)
        state.sequence += 1
        if not partial:
            self._publish(state, report)
            self._log_level(state, report)
        if state.store is not None:
            try:
                state.store.write(block, state.profile, {
                    "model": sampler.model, "version": sampler.version,
                    "closed": datetime.now(UTC).isoformat(timespec="milliseconds"),
                    "score": report.score, "level": report.level.label, "partial": partial,
                })
            except OSError as exc:  # a read-only or full disk: keep analysing, stop storing
                log.error("drift sample store disabled: cannot write", extra={
                    "model": sampler.model, "version": sampler.version,
                    "directory": str(state.store.directory), "error": repr(exc),
                })
                state.store = None
        return report

    def flush(self) -> None:
        """Write every partial fixed window to the store (at shutdown)."""
        for state in self._states.values():
            if state.windows is None or state.profile is None:
                continue
            block = state.windows.flush()
            if block.rows:
                self._fixed(state, block, partial=True)

    # -- profiles --------------------------------------------------------------------------------

    def _load_profile(self, state: _VersionState, now: float) -> bool:
        if now < state.retry_at:
            return False
        sampler = state.sampler
        path = profiles.profile_path(self._repository, sampler.model, sampler.version)
        if not path.exists():
            state.retry_at = now + self._profile_retry
            if not state.announced_missing:
                state.announced_missing = True
                log.warning("drift sampling waits for a reference profile", extra={
                    "model": sampler.model, "version": sampler.version, "expected": str(path),
                    "hint": f"peregrine drift profile --model {sampler.model} "
                            f"--version {sampler.version} --data FILE",
                })
            return False
        state.retry_at = now + self._profile_retry
        profile = profiles.load(path)
        config = sampler.config
        wanted = layouts(sampler.spec, config)
        chosen = [t for t in wanted if _profiled_as(profile, t)]
        unprofiled = [t.name for t in wanted if t not in chosen]
        if unprofiled:
            log.warning("drift profile lacks tensors (or has them as another kind); they are "
                        "not monitored", extra={
                "model": sampler.model, "version": sampler.version,
                "tensors": ",".join(unprofiled),
            })
        if not chosen:
            raise ValueError(f"profile {path} has none of the model's tensors")
        state.profile = _restricted(profile, chosen)
        state.layouts = chosen
        state.widths = {t.name: len(t.features) for t in state.profile.tensors}
        state.windows = Windows(config.window)
        if config.store_max_bytes > 0:
            state.store = SampleStore(
                config.store_path(self._repository, sampler.model, sampler.version),
                config.store_max_bytes, config.store_format,
            )
        sampler.activate(
            frozenset(t.name for t in chosen if t.role is Role.INPUT),
            frozenset(t.name for t in chosen if t.role is Role.OUTPUT),
        )
        log.info("drift monitoring active", extra={
            "model": sampler.model, "version": sampler.version,
            "features": state.profile.feature_count, "sample_rate": config.sample_rate,
            "window": config.window,
        })
        return True

    # -- results ---------------------------------------------------------------------------------

    def _publish(self, state: _VersionState, report: WindowReport) -> None:
        state.latest[report.window] = report
        gauges = self._gauges
        if gauges is None:
            return
        for f in report.features:
            numeric = f.kind is Kind.NUMERIC
            gauges.set_feature(
                report.model, report.version, report.window, f.feature,
                psi=f.psi,
                ks_pvalue=f.pvalue if numeric else math.nan,
                chi2_pvalue=math.nan if numeric else f.pvalue,
                js=f.js, missing_rate=f.missing_rate, out_of_range=f.out_of_range,
                level=int(f.level),
            )
        gauges.set_model(report.model, report.version, report.window, score=report.score,
                         level=int(report.level), rows=report.rows)

    def _log_level(self, state: _VersionState, report: WindowReport) -> None:
        if report.level == state.level:
            return
        flagged = [f for f in report.worst() if f.level > Level.OK][:5]
        log.log(
            logging.WARNING if report.level > state.level else logging.INFO,
            "drift level changed",
            extra={
                "model": report.model, "version": report.version,
                "from": state.level.label, "to": report.level.label,
                "score": round(report.score, 4), "window": report.sequence,
                "features": "; ".join(f"{f.feature}: {', '.join(f.reasons)}" for f in flagged),
            },
        )
        state.level = report.level

    def reports(self) -> list[WindowReport]:
        """The latest report of each version and window kind (ModelStatistics-style output
        for an admin service)."""
        return [r for s in list(self._states.values()) for r in list(s.latest.values())]


#: Niceness of the analyser thread: serving always comes first. Under a saturated CPU the
#: analysis waits (the ring then drops, and counts, what it cannot hold) instead of taking
#: cycles from requests; it catches up as soon as the server has idle time.
ANALYSER_NICENESS = 19


def _lower_own_priority() -> None:
    """Lower this thread's scheduling priority (Linux: niceness is per thread)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), ANALYSER_NICENESS)
    except (AttributeError, OSError) as exc:  # not Linux, or not permitted
        log.debug("drift analyser runs at normal priority", extra={"error": repr(exc)})


def _profiled_as(profile: ReferenceProfile, layout: TensorLayout) -> bool:
    tensor = profile.tensor(layout.name)
    return tensor is not None and tensor.kind is layout.kind and tensor.role is layout.role


def _restricted(profile: ReferenceProfile, chosen: list[TensorLayout]) -> ReferenceProfile:
    names = {t.name for t in chosen}
    return ReferenceProfile(
        model=profile.model, version=profile.version, rows=profile.rows,
        created=profile.created, source=profile.source,
        tensors=tuple(t for t in profile.tensors if t.name in names),
    )
