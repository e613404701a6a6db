"""The layout of a run document, checked without a schema library.

A spec is a dict of key -> expected type (a type, a tuple of types, a nested spec dict, or
a one-element list holding the spec of every item). Extra keys are allowed, so the layout can
grow without breaking old readers; a missing key or a wrong type is an error.
"""

from __future__ import annotations

from typing import Any

#: Version tag of the run document's layout.
SCHEMA = "peregrine-bench/1"

Spec = dict[str, Any]
NUMBER = (int, float)
NONE = type(None)

LATENCY: Spec = {key: NUMBER for key in ("p50", "p90", "p99", "p99.9", "max", "min", "mean")}
CPU: Spec = {"percent": NUMBER, "us_per_request": NUMBER}

STEP: Spec = {
    "concurrency": (int, NONE),
    "rate": (*NUMBER, NONE),
    "throughput_rps": NUMBER,
    "samples_per_s": NUMBER,
    "sent": int,
    "ok": int,
    "errors": dict,
    "window_s": NUMBER,
    "latency_ms": LATENCY,
    "histogram": str,
    "send_lag_ms": (dict, NONE),
    "client_cpu": CPU,
    "server_cpu": (dict, NONE),
    "server_split": (dict, NONE),
    "bound": str,
    "repeats": [{"throughput_rps": NUMBER, "p50_ms": NUMBER, "p99_ms": NUMBER}],
}

RUN: Spec = {
    "schema": str,
    "kind": str,
    "created": str,
    "command": list,
    "inputs": {
        "url": str,
        "model": str,
        "version": str,
        "rpc": str,
        "mode": str,
        "sweep": str,
        "concurrency": [int],
        "rates": [NUMBER],
        "arrival": str,
        "max_inflight": int,
        "duration_s": (*NUMBER, NONE),
        "requests": (int, NONE),
        "warmup_s": NUMBER,
        "repeats": int,
        "processes": int,
        "batch_size": int,
        "shapes": dict,
        "input_file": (str, NONE),
        "seed": int,
        "label": str,
        "request": {"tensors": list, "rows": int, "bytes": int},
    },
    "server": {"url": str, "pid": (int, NONE), "metadata": (dict, NONE)},
    "environment": {
        "packages": dict,
        "machine": {"cpu_model": str, "nproc": int, "cpu_count": int},
        "git_revision": str,
        "pinning": {"generator_cpus": list, "server_cpus": (list, NONE)},
    },
    "steps": [STEP],
}


class SchemaError(ValueError):
    """A document that is not a run document; the message lists every problem."""


def _check(value: Any, spec: Any, path: str, problems: list[str]) -> None:
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            problems.append(f"{path}: expected an object, got {type(value).__name__}")
            return
        for key, sub in spec.items():
            if key not in value:
                problems.append(f"{path}.{key}: missing")
            else:
                _check(value[key], sub, f"{path}.{key}", problems)
    elif isinstance(spec, list):
        if not isinstance(value, list):
            problems.append(f"{path}: expected a list, got {type(value).__name__}")
            return
        for index, item in enumerate(value):
            _check(item, spec[0], f"{path}[{index}]", problems)
    else:
        types = spec if isinstance(spec, tuple) else (spec,)
        # bool is an int to Python, never to a reader of the document.
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            names = " or ".join("null" if t is NONE else t.__name__ for t in types)
            problems.append(f"{path}: expected {names}, got {type(value).__name__}")


def problems_of(document: Any) -> list[str]:
    problems: list[str] = []
    _check(document, RUN, "run", problems)
    if isinstance(document, dict) and document.get("schema") not in (None, SCHEMA):
        problems.append(f"run.schema: expected '{SCHEMA}', got {document.get('schema')!r}")
    if isinstance(document, dict) and isinstance(document.get("steps"), list):
        for index, step in enumerate(document["steps"]):
            if isinstance(step, dict) and isinstance(step.get("errors"), dict):
                for code, count in step["errors"].items():
                    if not isinstance(code, str) or not isinstance(count, int):
                        problems.append(f"run.steps[{index}].errors: {code!r}: {count!r}")
    return problems


def validate_run(document: Any) -> None:
    problems = problems_of(document)
    if problems:
        raise SchemaError("not a run document:\n  " + "\n  ".join(problems))
