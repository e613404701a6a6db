"""The soak's figures: requests by kind and status, the server's footprint after the warm-up
against the end of the run, the goals, the chart and the RESULTS.md section."""

from __future__ import annotations

import itertools
import statistics
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from bench.results_md import markdown_table, section_header
from bench.studies.soak_load import OK, Tally, expected

SECTION = "## Soak"
#: Each footprint figure is the median of the samples in a window this long (a fraction of
#: the run) just after the warm-up and at the end: one reading catches a stream or a
#: shared-memory region open at that instant.
WINDOW_FRACTION = 0.1
RSS_GROWTH_GOAL_PERCENT = 5.0
#: Descriptors the end may hold beyond the warm-up median and still count as flat: a client
#: connection or a registered region open while the reading was taken.
FD_SLACK = 2


def _family(kind: str) -> str:
    return kind.split("/", 1)[0]


def _window(samples: list[dict[str, Any]], start_s: float, end_s: float,
            key: str) -> float:
    inside = [s[key] for s in samples if start_s <= s["t_s"] <= end_s]
    if not inside:  # a short run: the sample nearest the window's start
        inside = [min(samples, key=lambda s: abs(s["t_s"] - start_s))[key]]
    return float(statistics.median(inside))


def summarise(tally: Tally, samples: list[dict[str, Any]], swaps: list[dict[str, Any]],
              warmup_s: float) -> dict[str, Any]:
    duration = samples[-1]["t_s"]
    window = max(WINDOW_FRACTION * duration, 1e-9)
    by_kind: dict[str, dict[str, int]] = defaultdict(dict)
    for (kind, status), count in sorted(tally.snapshot().items()):
        by_kind[kind][status] = count
    totals: Counter[str] = Counter()
    expected_errors: Counter[str] = Counter()
    for kind, statuses in by_kind.items():
        for status, count in statuses.items():
            totals[_family(kind)] += count
            if status != OK and status in expected(kind):
                expected_errors[_family(kind)] += count

    def footprint(key: str, scale: float = 1.0) -> dict[str, float]:
        warm = _window(samples, warmup_s, warmup_s + window, key) / scale
        end = _window(samples, duration - window, duration, key) / scale
        values = [s[key] / scale for s in samples]
        return {"start": values[0], "warm": warm, "end": end, "min": min(values),
                "max": max(values)}

    rss = footprint("rss_kib", 1024.0)
    rss_figures = {f"{k}_mib": round(v, 1) for k, v in rss.items()}
    rss_figures["growth_percent"] = round(100 * (rss["end"] - rss["warm"]) / rss["warm"], 2)
    fds, threads = footprint("fds"), footprint("threads")
    return {
        "duration_s": duration,
        "warmup_s": round(warmup_s, 1),
        "window_s": round(window, 1),
        "requests": dict(by_kind),
        "totals": dict(sorted(totals.items())),
        "expected_errors": dict(sorted(expected_errors.items())),
        "unexpected_errors": tally.unexpected_count,
        "unexpected_examples": tally.unexpected,
        "rss": rss_figures,
        "fds": fds,
        "threads": threads,
        "swaps": swaps,
        "route_changes": by_kind.get("route/change", {}).get(OK, 0),
        "samples": samples,
        "goals": {
            "no_unexpected_errors": tally.unexpected_count == 0,
            "rss_growth_under_5_percent": rss_figures["growth_percent"]
            < RSS_GROWTH_GOAL_PERCENT,
            "fds_flat": fds["end"] <= fds["warm"] + FD_SLACK,
        },
    }


def throughput(samples: list[dict[str, Any]]) -> tuple[list[float], dict[str, list[float]]]:
    """Interval midpoints and requests per second of each family between samples."""
    families = sorted({_family(k.split("|")[0]) for s in samples for k in s["counts"]}
                      - {"swap", "route", "crash"})
    times: list[float] = []
    rates: dict[str, list[float]] = {f: [] for f in families}
    for before, after in itertools.pairwise(samples):
        seconds = after["t_s"] - before["t_s"]
        if seconds <= 0:
            continue
        times.append((before["t_s"] + after["t_s"]) / 2)
        for family in families:
            def total(sample: dict[str, Any], family: str = family) -> int:
                return sum(n for k, n in sample["counts"].items()
                           if _family(k.split("|")[0]) == family)
            rates[family].append((total(after) - total(before)) / seconds)
    return times, rates


def plot(document: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = document["samples"]
    t = [s["t_s"] for s in samples]
    figure, (rss_axis, fd_axis, rate_axis) = plt.subplots(3, 1, figsize=(12, 8), sharex=True)
    rss_axis.plot(t, [s["rss_kib"] / 1024 for s in samples], color="tab:blue")
    rss_axis.set(ylabel="server RSS (MiB)")
    fd_axis.plot(t, [s["fds"] for s in samples], color="tab:orange", label="open descriptors")
    fd_axis.plot(t, [s["threads"] for s in samples], color="tab:gray", label="threads")
    fd_axis.set(ylabel="count")
    fd_axis.legend(fontsize=7, loc="upper left")
    times, rates = throughput(samples)
    for family, values in rates.items():
        rate_axis.plot(times, values, label=family)
    rate_axis.set(xlabel="seconds", ylabel="requests/s")
    rate_axis.legend(fontsize=7, loc="upper left", ncol=4)
    for axis in (rss_axis, fd_axis, rate_axis):
        axis.axvspan(0, document["warmup_s"], color="#f2f2f2", zorder=0)
        for number, swap in enumerate(document["swaps"]):
            axis.axvline(swap["published_s"], color="tab:purple", linestyle=":", linewidth=0.8,
                         label="swap" if number == 0 and axis is rss_axis else None)
        axis.grid(True, alpha=0.3)
    if document["swaps"]:
        rss_axis.legend(fontsize=7, loc="upper left")
    env = document["environment"]
    rss_axis.set_title(f"soak, {document['duration_s'] / 60:.1f} min: server footprint and "
                       f"throughput (warm-up shaded; {env['machine']['nproc']} CPUs, "
                       f"git {env['git_revision'][:12]})")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)
    plt.close(figure)


def _yes(met: bool) -> str:
    return "met" if met else "**missed**"


def markdown(document: dict[str, Any]) -> str:
    settings, rss, fds, threads, drift = (
        document[k] for k in ("settings", "rss", "fds", "threads", "drift"))
    goals = document["goals"]
    rows = []
    for kind, statuses in document["requests"].items():
        allowed = expected(kind)
        unexpected = sum(n for s, n in statuses.items() if s not in allowed)
        rows.append([kind, str(sum(statuses.values())),
                     ", ".join(f"{s} {n}" for s, n in statuses.items()), str(unexpected)])
    lines = [
        *section_header(SECTION, document),
        f"`peregrine serve` in poll mode on CPU {settings['server_cpus']}, the clients (threads "
        f"of one process) on CPU {settings['client_cpus']}, for {document['duration_s'] / 60:.1f}"
        f" minutes: {settings['unary_threads']} threads of unary requests and one stream "
        "(closed and reopened every 50 rounds of 16) cycling over the example models, answers "
        "checked; shared-memory cycles (create, register, 10 CNN requests from and into the "
        "regions, unregister, destroy); requests that must fail, each with its status (wrong "
        "shape INVALID_ARGUMENT, unknown model NOT_FOUND, past `--max-request-bytes` "
        f"RESOURCE_EXHAUSTED); a new version of `mlp_classifier` (drift sampling "
        f"{settings['drift_sample_rate']:.0%}) published every {settings['swap_every_s']:.0f} s "
        "and the replaced one deleted once gone; the routing table of `mlp_routed` changed "
        f"every {settings['route_every_s']:.0f} s (A/B, skewed with a shadow, cleared). The "
        f"server's VmRSS, descriptors and threads were read every "
        f"{settings['sample_every_s']:.0f} s. Any status other than the one a request's kind "
        "expects is unexpected, an UNAVAILABLE during a swap included.",
        "",
        markdown_table(["kind", "requests", "statuses", "unexpected"], rows),
        "",
        f"Unexpected errors: **{document['unexpected_errors']}** "
        f"({_yes(goals['no_unexpected_errors'])}; goal 0). Swaps done: "
        f"**{len(document['swaps'])}**; route changes: **{document['route_changes']}**.",
        "",
        "Drift counters of the version serving at the end (a replaced version's series go "
        "with it): " + ", ".join(f"{k} {v:g}" for k, v in sorted(drift.items())) + ".",
        "",
        f"Footprint: medians over {document['window_s']:.0f} s windows after the "
        f"{document['warmup_s']:.0f} s warm-up and at the end.",
        "",
        markdown_table(["", "start", "after warm-up", "end", "min", "max", "goal"], [
            ["RSS MiB", f"{rss['start_mib']:.1f}", f"{rss['warm_mib']:.1f}",
             f"{rss['end_mib']:.1f}", f"{rss['min_mib']:.1f}", f"{rss['max_mib']:.1f}",
             f"growth {rss['growth_percent']:+.2f} % < 5 %: "
             f"{_yes(goals['rss_growth_under_5_percent'])}"],
            ["open descriptors", *(f"{fds[k]:.0f}" for k in ("start", "warm", "end", "min",
                                                             "max")),
             f"flat (end ≤ warm-up + {FD_SLACK}): {_yes(goals['fds_flat'])}"],
            ["threads", *(f"{threads[k]:.0f}" for k in ("start", "warm", "end", "min",
                                                        "max")), ""],
        ]),
        "",
        f"Load average (1 min) at the start and the end: {document['loadavg'][0]:.2f} and "
        f"{document['loadavg'][1]:.2f} on {document['environment']['machine']['nproc']} CPUs: "
        "a busy shared machine (other jobs ran benchmarks meanwhile), so throughput varies "
        "with them; the footprint and the statuses do not depend on it.",
        "",
        "![soak](results/soak.png) · data: [results/soak.json](results/soak.json)",
        "",
    ]
    if document["unexpected_examples"]:
        lines[-2:-2] = ["First unexpected errors:", "",
                        *(f"- {e['at_s']} s `{e['kind']}` {e['status']}: {e['message']}"
                          for e in document["unexpected_examples"][:10]), ""]
    return "\n".join(lines)
