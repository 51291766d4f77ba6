"""The benchmark's report: machine information, the issue's targets judged against the figures, the printed table.

Everything here works on the results document (the JSON written to ``bench/results.json``), so a saved run can
be printed again and a partial run (``--only``) prints what it measured, with targets it did not measure shown
as "not measured".
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.servers import ROOT

Results = Mapping[str, Any]
#: The code whose speed is measured; uncommitted changes there are recorded with the results.
MEASURED_PATHS = ("service", "cds_hooks", "gunicorn.conf.py")
PACKAGES = ("flask", "werkzeug", "gunicorn", "fhir.resources", "pydantic", "marshmallow", "SQLAlchemy", "orjson")


def machine_info(loader: str, loader_version: str | None) -> dict[str, Any]:
    """Where and when the run happened: CPU model and cores, memory, OS, Python, packages, commit, load generator."""
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "cpu_model": _cpu_model(),
            "cpu_count": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
            "memory_total_mb": _memory_total_mb(), "platform": platform.platform(),
            "python": platform.python_version(), "packages": {name: _version(name) for name in PACKAGES},
            "commit": _git_commit(), "uncommitted_changes": _uncommitted_changes(), "loader": loader,
            "loader_version": loader_version}


@dataclass(frozen=True)
class Target:
    """One target of issue 5: a figure picked out of the results, its limit, and which side of it is good."""

    label: str
    limit: float
    at_most: bool
    unit: str
    figure: Callable[[Results], float | None]

    def judge(self, results: Results) -> dict[str, Any]:
        """This target's figure and verdict (``met`` is None when the run did not measure it)."""
        value = self.figure(results)
        met = None if value is None else (value <= self.limit if self.at_most else value >= self.limit)
        return {"target": self.label, "limit": self.limit, "figure": value, "met": met,
                "shown": "-" if value is None else format_figure(value, self.unit)}


def format_figure(value: float, unit: str) -> str:
    """A figure with its unit: 2.31x, 57.0%, 143 MB."""
    if unit == "%":
        return f"{value * 100:.1f}%"
    if unit == "MB":
        return f"{value:.0f} MB"
    return f"{value:.2f}x"


def _tier_field(section: str, tier: str, name: str) -> Callable[[Results], float | None]:
    def pick(results: Results) -> float | None:
        rows = results.get(section) or []
        if isinstance(rows, Mapping):
            rows = rows.get("tiers") or []
        return next((row[name] for row in rows if row["tier"] == tier), None)
    return pick


def _field(section: str, name: str) -> Callable[[Results], float | None]:
    return lambda results: (results.get(section) or {}).get(name)


#: Issue 5's targets. The linearity tolerance (1.25) is the benchmark's reading of "grows linearly".
TARGETS = (
    Target("typical: in-process time <= 5x json.loads", 5.0, True, "x",
           _tier_field("in_process", "typical", "ratio_to_json_loads")),
    Target("heavy: in-process time <= 3x json.loads", 3.0, True, "x",
           _tier_field("in_process", "heavy", "ratio_to_json_loads")),
    Target("extreme: in-process time <= 3x json.loads", 3.0, True, "x",
           _tier_field("in_process", "extreme", "ratio_to_json_loads")),
    Target("linear: per-resource time heavy->extreme <= 1.25x", 1.25, True, "x",
           _field("in_process", "growth_heavy_to_extreme")),
    Target("HTTP typical: throughput >= 50% of do-nothing", 0.5, False, "%",
           _tier_field("http", "typical", "throughput_ratio")),
    Target("memory heavy: peak RSS per worker <= 200 MB", 200.0, True, "MB",
           _tier_field("memory", "heavy", "peak_rss_mb")),
    Target("no-prefetch: total <= 1.3x slowest single fetch", 1.3, True, "x",
           _field("no_prefetch", "ratio_to_slowest_fetch")),
)


def judge_targets(results: Results) -> list[dict[str, Any]]:
    """Every target with its figure and verdict."""
    return [target.judge(results) for target in TARGETS]


def write_results(results: Results, path: Path) -> None:
    """Write the results document as indented JSON (parent directories created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned."""
    cells = [[str(cell) for cell in row] for row in [headers, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def format_report(results: Results) -> str:
    """The whole report as printed by ``make bench``."""
    machine = results["machine"]
    parts = [f"Neutropenia CDS benchmark, {machine['date']}\n"
             f"{machine['cpu_model']}, {machine['usable_cpus']} of {machine['cpu_count']} CPUs, "
             f"{machine['memory_total_mb']} MB RAM, Python {machine['python']}, {machine['platform']}\n"
             f"commit {machine['commit']}{_dirty_note(machine)}, "
             f"load generator: {machine['loader_version'] or machine['loader']}"]
    for section, render in (("in_process", _in_process), ("http", _http), ("memory", _memory),
                            ("no_prefetch", _no_prefetch)):
        if results.get(section):
            parts.append(render(results))
    parts.append(_targets(results))
    return "\n\n".join(parts) + "\n"


def _dirty_note(machine: Mapping[str, Any]) -> str:
    changed = machine.get("uncommitted_changes")
    return f" + uncommitted changes in {', '.join(changed)}" if changed else ""


def _in_process(results: Results) -> str:
    section = results["in_process"]
    headers = ["tier", "resources", "body MB", "runs", "median ms", "p95 ms", "json.loads ms", "ratio",
               "us/resource"]
    text = ("In-process service time per request (whole WSGI request path, Flask test client)\n"
            "every resource seen for the first time (validation memo emptied before each run; targets judged here)\n"
            + table(headers, _in_process_rows(section["tiers"])))
    if section.get("tiers_seen_before"):
        text += ("\n\nthe same request again (resources validated before, as when a chart is reopened)\n"
                 + table(headers, _in_process_rows(section["tiers_seen_before"])))
    if "growth_heavy_to_extreme" in section:
        text += (f"\nper-resource time heavy -> extreme: {section['growth_heavy_to_extreme']:.2f}x "
                 "(1.00 = linear in the number of resources)")
    return text


def _in_process_rows(rows: Sequence[Mapping[str, Any]]) -> list[list[Any]]:
    return [[r["tier"], r["resources"], f"{r['body_bytes'] / 1e6:.2f}", r["runs"], f"{r['service_median_ms']:.1f}",
             f"{r['service_p95_ms']:.1f}", f"{r['json_loads_median_ms']:.2f}", f"{r['ratio_to_json_loads']:.2f}x",
             f"{r['service_us_per_resource']:.1f}"] for r in rows]


def _http(results: Results) -> str:
    settings = results.get("settings", {}).get("http", {})
    rows = []
    for r in results["http"]:
        for label, run in (("service", r["service"]), ("do-nothing", r["do_nothing"])):
            rows.append([f"{r['tier']} {label}", f"{run['requests_per_second']:.1f}", f"{run['p50_ms']:.1f}",
                         f"{run['p99_ms']:.1f}", run["requests"], ""])
        rows[-2][-1] = format_figure(r["throughput_ratio"], "%")
    return (f"HTTP under gunicorn on loopback ({settings.get('workers')} workers x {settings.get('threads')} "
            f"threads, {settings.get('connections')} connections, {settings.get('seconds')} s after "
            f"{settings.get('warmup_seconds')} s warm-up, {settings.get('loader')})\n"
            + table(["tier / app", "req/s", "p50 ms", "p99 ms", "requests", "of do-nothing"], rows))


def _memory(results: Results) -> str:
    rows = [[r["tier"], r["concurrent_requests"], f"{r['idle_rss_mb']:.1f}", f"{r['peak_rss_mb']:.1f}"]
            for r in results["memory"]]
    return ("Peak resident memory per worker (one-worker gunicorn: 1 request, then concurrent ones; VmHWM)\n"
            + table(["tier", "concurrent", "idle MB", "peak MB"], rows))


def _no_prefetch(results: Results) -> str:
    r = results["no_prefetch"]
    fetches = ", ".join(f"{key} {ms:.0f}" for key, ms in r["fetch_median_ms"].items())
    return (f"No-prefetch path (fixture FHIR server, {r['delay_ms']} ms delay on every request, "
            f"{r['runs']} runs, medians)\n"
            + table(["total ms", "slowest fetch ms", "ratio"],
                    [[f"{r['total_median_ms']:.0f}", f"{r['slowest_fetch_median_ms']:.0f}",
                      f"{r['ratio_to_slowest_fetch']:.2f}x"]])
            + f"\ndirect fetch medians (ms): {fetches}")


def _targets(results: Results) -> str:
    verdicts = {True: "met", False: "NOT MET", None: "not measured"}
    rows = [[t["target"], t["shown"], verdicts[t["met"]]] for t in results.get("targets") or judge_targets(results)]
    return "Targets (issue 5)\n" + table(["target", "figure", "verdict"], rows)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_total_mb() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024 // 1_000_000
    except OSError:
        pass
    return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _uncommitted_changes() -> list[str] | None:
    """Files of the measured code (service, protocol, gunicorn settings) that differ from the commit."""
    try:
        completed = subprocess.run(["git", "status", "--porcelain", "--", *MEASURED_PATHS], cwd=ROOT,
                                   capture_output=True, text=True, check=False)
    except OSError:
        return None
    return [line[3:] for line in completed.stdout.splitlines()] if completed.returncode == 0 else None


def _git_commit() -> str | None:
    try:
        completed = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                   text=True, check=False)
    except OSError:
        return None
    return completed.stdout.strip() or None
