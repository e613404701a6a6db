"""bench/RESULTS.md and the charts in bench/results/, rebuilt from the latest result files.

Inputs: bench/results/comparisons.json (when and how each comparison last ran),
bench/results/ceiling.json and bench/results/runs/<server>__<model>__<rpc>.json. Every
comparison script calls :func:`write_results` when it finishes, so RESULTS.md always shows
the latest figures of every comparison, each with its own date, revision and command.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.compare.scenario import COMPARISONS_FILE, MODELS, RPCS, RUNS_DIR
from bench.loadgen.plots import plot_runs
from bench.loadgen.schema import problems_of
from bench.loadgen.table import step_rows
from bench.results_md import RESULTS_DIR, RESULTS_MD, keep_other_sections, markdown_table

CEILING_FILE = RESULTS_DIR / "ceiling.json"

#: Display order and the comparison each server belongs to.
SERVERS: tuple[tuple[str, str, str], ...] = (
    ("noop", "no-op grpc.aio servicer (floor)", "ceiling"),
    ("plain", "plain-Python batching server (the yardstick)", "ceiling"),
    ("peregrine-batching", "**peregrine**, batching on", "ours"),
    ("peregrine-no-batching", "**peregrine**, batching off", "ours"),
    ("mlserver-batching", "MLServer, adaptive batching on", "peers"),
    ("mlserver-no-batching", "MLServer, adaptive batching off", "peers"),
    ("kserve", "KServe", "peers"),
)


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def load_runs() -> dict[tuple[str, str, str], dict[str, Any]]:
    runs = {}
    for path in sorted(RUNS_DIR.glob("*__*__*.json")):
        document = _load_json(path)
        if document is None or problems_of(document):
            continue
        server, model, rpc = path.stem.split("__")
        runs[(server, model, rpc)] = document
    return runs


def _cell(step: dict[str, Any] | None) -> str:
    if step is None:
        return "-"
    latency = step["latency_ms"]
    errors = sum(step["errors"].values())
    text = f"{step['throughput_rps']:,.0f} ({latency['p50']:.2f} / {latency['p99']:.2f})"
    return text + (f" ⚠{errors} err" if errors else "")


def summary_table(runs: dict[tuple[str, str, str], dict[str, Any]], model: str, rpc: str
                  ) -> str | None:
    present = [(key, label) for key, label, _ in SERVERS if (key, model, rpc) in runs]
    if not present:
        return None
    levels = sorted({s["concurrency"] for key, _ in present
                     for s in runs[(key, model, rpc)]["steps"] if s["concurrency"]})
    top = levels[-1]
    floor = runs.get(("noop", model, rpc))
    floor_top = next((s for s in floor["steps"] if s["concurrency"] == top), None) if floor \
        else None
    header = ["server", *(f"c={c}: infer/s (p50 / p99 ms)" for c in levels),
              f"server CPU % (c={top})", f"client CPU % (c={top})", f"vs floor (c={top})",
              f"queue / compute us (c={top})", f"mean batch (c={top})"]
    rows = []
    for key, label in present:
        steps = {s["concurrency"]: s for s in runs[(key, model, rpc)]["steps"]}
        last = steps.get(top)
        split = (last or {}).get("server_split") or {}
        server_cpu = (last or {}).get("server_cpu") or {}
        ratio = (f"{last['throughput_rps'] / floor_top['throughput_rps']:.2f}"
                 if last and floor_top and floor_top["throughput_rps"] else "-")
        rows.append([
            label, *(_cell(steps.get(c)) for c in levels),
            f"{server_cpu['percent']:.0f}" if server_cpu else "-",
            f"{last['client_cpu']['percent']:.0f}" if last else "-",
            ratio,
            f"{split['queue_us']:.0f} / {split['compute_us']:.0f}" if split else "n/a",
            f"{split['mean_batch_rows']:.1f}" if split else "n/a",
        ])
    return markdown_table(header, rows)


def ceiling_table(ceiling: dict[str, Any], runs: dict[tuple[str, str, str], dict[str, Any]]
                  ) -> str:
    header = ["model", "batch rows", "onnxruntime in-process samples/s", "us per session.run",
              "best peregrine samples/s (any rpc, c)", "peregrine / ceiling"]
    rows = []
    for model, batches in ceiling["models"].items():
        best = max((s["samples_per_s"] for (server, m, _), doc in runs.items()
                    if m == model and server.startswith("peregrine") for s in doc["steps"]),
                   default=0.0)
        for batch, figures in batches.items():
            rows.append([model, batch, f"{figures['samples_per_s']:,.0f}",
                         f"{figures['us_per_run']:.0f}", f"{best:,.0f}" if best else "-",
                         f"{best / figures['samples_per_s']:.2f}" if best else "-"])
    return markdown_table(header, rows)


def charts(runs: dict[tuple[str, str, str], dict[str, Any]]) -> list[Path]:
    paths = []
    for model in MODELS:
        for rpc in RPCS:
            present = [(key, label.replace("*", "")) for key, label, _ in SERVERS
                       if (key, model, rpc) in runs]
            if not present:
                continue
            path = RESULTS_DIR / f"{model}_{rpc}.png"
            plot_runs([runs[(key, model, rpc)] for key, _ in present],
                      [label for _, label in present], path,
                      title=f"{model}, {rpc}: all servers (closed loop)")
            paths.append(path)
    return paths


def _comparison_section(name: str, info: dict[str, Any],
                        runs: dict[tuple[str, str, str], dict[str, Any]]) -> list[str]:
    scenario = info["scenario"]
    lines = [
        f"### {name}",
        "",
        f"- date: {info['date']}; git revision: `{info['git_revision']}`",
        f"- command: `{info['command'].strip()}`",
        f"- machine: {info['machine']['cpu_model']}, nproc {info['machine']['nproc']}",
        f"- load: closed loop, concurrency {scenario['concurrency']}, {scenario['duration_s']} s "
        f"per step after {scenario['warmup_s']} s warm-up, median of {scenario['repeats']} "
        f"repeats, {scenario['processes']} generator process(es); server pinned "
        f"`taskset -c {scenario['server_cpus']}`, generator `taskset -c "
        f"{scenario['generator_cpus']}`",
        f"- onnxruntime: {scenario['ort_parameters']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in sorted(info["versions"].items())),
        *(f"- {note}" for note in info["notes"]),
        "",
    ]
    for key, label, comparison in SERVERS:
        if comparison != name:
            continue
        for model in MODELS:
            for rpc in RPCS:
                document = runs.get((key, model, rpc))
                if document is None:
                    continue
                lines += [f"{label}: {model}, {rpc}", "",
                          markdown_table(*step_rows(document["steps"])), ""]
    return lines


def render(runs: dict[tuple[str, str, str], dict[str, Any]], comparisons: dict[str, Any],
           ceiling: dict[str, Any] | None, chart_paths: list[Path]) -> str:
    dates = sorted(info["date"] for info in comparisons.values())
    revisions = sorted({info["git_revision"] for info in comparisons.values()})
    machine = next(iter(comparisons.values()))["machine"] if comparisons else {}
    loads = sorted(doc["environment"]["machine"].get("load_average_1m", 0.0)
                   for doc in runs.values())
    lines = [
        "# Benchmark results",
        "",
        "Regenerate everything with `python -m bench.compare` (about 15 minutes; see "
        "bench/README.md). Each comparison can also run alone: `python -m "
        "bench.compare.ceiling`, `python -m bench.compare.ours`, `python -m "
        "bench.compare.peers`.",
        "",
        f"- dates: {dates[0]} .. {dates[-1]}" if dates else "- no results yet",
        f"- git revision(s): {', '.join(f'`{r}`' for r in revisions)}",
        f"- machine: {machine.get('cpu_model', '?')}, nproc {machine.get('nproc', '?')}, "
        f"kernel {machine.get('kernel', '?')}, Python {machine.get('python', '?')}",
        (f"- 1-minute load average when the runs started: {loads[0]:.1f} .. {loads[-1]:.1f} "
         "(2 cores; the server and the generator themselves account for up to ~2, more "
         "means other work shared the machine and the figures are low)"
         if loads else "- load average: unknown"),
        "- every server pinned to CPU 0 and the load generator to CPU 1 (`taskset -c`), "
        "one ONNX Runtime intra-op thread with spinning off everywhere",
        "- cells: throughput in infer/s (p50 / p99 latency in ms), closed loop with c "
        "requests in flight, batch of 1 row per request; median of the repeats by "
        "throughput; 'vs floor' = throughput / the no-op servicer's at the same load",
        "- 'bound' (per step, in the tables below): `server` = the server used >= 90% of its "
        "core, `client` = the generator did. The no-op servicer's streaming rows are "
        "client-bound (one generator core drives about 7-8k streamed requests/s): the "
        "streaming floor is at least that, and 'vs floor' for streams is against it",
        "- the repeats differ by ±3-10% and sometimes 25-40% low (bench/README.md, noise): "
        "treat differences under ~10% as noise",
        "",
        "## Summary",
        "",
    ]
    for model in MODELS:
        for rpc in RPCS:
            table = summary_table(runs, model, rpc)
            if table is not None:
                lines += [f"### {model}, {rpc}", "", table, ""]
    if ceiling is not None:
        lines += [
            "## Ceiling: the model in-process", "",
            f"onnxruntime {ceiling['onnxruntime']} `session.run` back to back, "
            f"{ceiling['ort_parameters']}, pinned to CPU {ceiling['cpus']} "
            f"({ceiling['created']}, `{ceiling['git_revision']}`).", "",
            ceiling_table(ceiling, runs), "",
        ]
    if chart_paths:
        lines += ["## Charts", ""]
        lines += [f"- [{p.name}](results/{p.name})" for p in chart_paths]
        lines.append("")
    lines += ["## Per comparison", ""]
    for name in ("ceiling", "ours", "peers"):
        if name in comparisons:
            lines += _comparison_section(name, comparisons[name], runs)
    return "\n".join(lines).rstrip() + "\n"


def write_results() -> Path:
    runs = load_runs()
    comparisons = _load_json(COMPARISONS_FILE) or {}
    ceiling = _load_json(CEILING_FILE)
    chart_paths = charts(runs)
    generated = render(runs, comparisons, ceiling, chart_paths)
    RESULTS_MD.write_text(keep_other_sections(generated, RESULTS_MD), encoding="utf-8")
    return RESULTS_MD


if __name__ == "__main__":
    print(write_results())
