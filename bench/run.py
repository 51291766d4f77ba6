"""``make bench``: measure every figure of issue 5 in one run, print a table and write ``bench/results.json``.

    python -m bench.run [--quick] [--only in-process,http,memory,no-prefetch] [--loader auto|wrk|python]
                        [--output PATH] [--work-dir DIR]

Sections: in-process service time beside ``json.loads`` (every tier); HTTP throughput and latency under gunicorn
beside a do-nothing app (typical and heavy); peak resident memory per worker (every tier); the no-prefetch path
against a slow fixture FHIR server. ``--quick`` shrinks everything to a few seconds (for tests; its figures mean
nothing). Exit status: 0 when everything was measured, whether the targets were met or not; 1 when something
broke (a non-200 answer, a typical answer without cards, a server that would not start); 2 for bad arguments.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as ``python bench/run.py``: import from the repository, not from bench/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Mapping, Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

from bench import inprocess, load, memory, no_prefetch, report, throughput  # noqa: E402
from bench.payloads import TIERS, Tier, build_request, request_body  # noqa: E402
from bench.servers import ROOT, default_workers, gunicorn_threads  # noqa: E402
from bench.timing import BenchmarkError, RunPlan  # noqa: E402

SECTIONS = ("in-process", "http", "memory", "no-prefetch")
DEFAULT_OUTPUT = ROOT / "bench" / "results.json"


@dataclass(frozen=True)
class BenchConfig:
    """What one run measures and for how long."""

    tiers: Mapping[str, Tier]
    in_process: Mapping[str, RunPlan]
    http_tiers: tuple[str, ...]
    http_seconds: float
    warmup_seconds: float
    memory_tiers: tuple[str, ...]
    fetch_delay_seconds: float
    no_prefetch_runs: int
    workers: int = field(default_factory=default_workers)


#: The reference run: a little under three minutes on the 2-core machine.
FULL = BenchConfig(
    tiers=TIERS,
    in_process={"typical": RunPlan(30, 300, 8.0), "heavy": RunPlan(10, 60, 10.0), "extreme": RunPlan(5, 20, 15.0)},
    http_tiers=("typical", "heavy"), http_seconds=10.0, warmup_seconds=2.0,
    memory_tiers=("typical", "heavy", "extreme"), fetch_delay_seconds=0.3, no_prefetch_runs=5,
)
#: A smoke run of every code path in a few seconds, on smaller heavy and extreme tiers.
QUICK = BenchConfig(
    tiers={"typical": TIERS["typical"], "heavy": TIERS["heavy"].resized(500),
           "extreme": TIERS["extreme"].resized(1000)},
    in_process={name: RunPlan(2, 3, 0.2) for name in TIERS},
    http_tiers=("typical",), http_seconds=1.0, warmup_seconds=0.0,
    memory_tiers=("typical",), fetch_delay_seconds=0.05, no_prefetch_runs=2,
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; see the module docstring for the exit status."""
    args = _parser().parse_args(argv)
    sections = _sections(args.only) if args.only else SECTIONS
    loader = _choose_loader(args.loader)
    config = QUICK if args.quick else FULL
    try:
        if args.work_dir is not None:
            args.work_dir.mkdir(parents=True, exist_ok=True)
            results = run_benchmark(config, sections, loader, args.work_dir.resolve())
        else:
            with tempfile.TemporaryDirectory(prefix="neutropenia-bench-") as work_dir:
                results = run_benchmark(config, sections, loader, Path(work_dir))
    except BenchmarkError as error:
        print(f"bench: FAILED: {error}", file=sys.stderr)
        return 1
    report.write_results(results, args.output)
    sys.stdout.write(report.format_report(results))
    print(f"\nresults written to {args.output}")
    return 0


def run_benchmark(config: BenchConfig, sections: Sequence[str], loader: str, work_dir: Path) -> dict[str, Any]:
    """Measure ``sections`` with ``config``; the results document (machine, settings, figures, targets)."""
    bodies = {name: request_body(build_request(tier)) for name, tier in config.tiers.items()}
    threads = gunicorn_threads()
    results: dict[str, Any] = {
        "machine": report.machine_info(loader, load.wrk_version() if loader == "wrk" else "Python http.client"),
        "settings": {"quick": config is QUICK,
                     "tiers": {name: {"observations": tier.observations, "resources": tier.resources}
                               for name, tier in config.tiers.items()}},
    }
    if "in-process" in sections:
        results["settings"]["in_process"] = {name: vars(plan) for name, plan in config.in_process.items()}
        measured, seen_before = {}, {}
        with inprocess.local_app(work_dir) as app:
            for name, tier in config.tiers.items():
                _progress(f"in-process: {name} ({tier.resources} resources)")
                measured[name] = inprocess.measure_tier(app, name, tier.resources, bodies[name],
                                                        config.in_process[name])
                _progress(f"in-process: {name}, resources seen before")
                seen_before[name] = inprocess.measure_tier(app, name, tier.resources, bodies[name],
                                                           config.in_process[name], seen_before=True)
        results["in_process"] = inprocess.summarize(measured, seen_before)
    if "http" in sections:
        plan = throughput.LoadPlan(loader=loader, workers=config.workers, connections=config.workers * threads,
                                   warmup_seconds=config.warmup_seconds, seconds=config.http_seconds)
        results["settings"]["http"] = {**vars(plan), "threads": threads}
        results["http"] = []
        for name in config.http_tiers:
            _progress(f"HTTP: {name}, service and do-nothing app, {config.http_seconds:g} s each")
            body_file = work_dir / f"{name}.json"
            body_file.write_bytes(bodies[name])
            results["http"].append(throughput.measure_throughput(name, body_file, work_dir, plan).to_json())
    if "memory" in sections:
        results["memory"] = []
        for name in config.memory_tiers:
            _progress(f"memory: {name}")
            results["memory"].append(memory.measure_memory(name, bodies[name], work_dir,
                                                           concurrency=threads).to_json())
    if "no-prefetch" in sections:
        _progress(f"no-prefetch: {config.fetch_delay_seconds * 1000:.0f} ms delay per FHIR request")
        results["no_prefetch"] = no_prefetch.measure_no_prefetch(
            work_dir, delay_seconds=config.fetch_delay_seconds, runs=config.no_prefetch_runs).to_json()
    results["targets"] = report.judge_targets(results)
    return results


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds of everything; the figures mean nothing")
    parser.add_argument("--only", metavar="SECTIONS", help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--loader", choices=("auto", "wrk", "python"), default="auto",
                        help="HTTP load generator (auto: wrk if installed, else Python)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, metavar="PATH",
                        help="where to write the results JSON (default: bench/results.json)")
    parser.add_argument("--work-dir", type=Path, metavar="DIR",
                        help="keep the servers' logs and databases here (default: a temporary directory, removed)")
    return parser


def _sections(text: str) -> tuple[str, ...]:
    chosen = tuple(item.strip() for item in text.split(",") if item.strip())
    unknown = [item for item in chosen if item not in SECTIONS]
    if unknown or not chosen:
        _parser().error(f"--only: unknown section(s) {', '.join(unknown) or '(none given)'}; "
                        f"choose from {', '.join(SECTIONS)}")
    return chosen


def _choose_loader(requested: str) -> str:
    if requested != "auto":
        if requested == "wrk" and not load.wrk_available():
            _parser().error("--loader wrk: wrk is not installed (Debian: apt-get install wrk)")
        return requested
    if load.wrk_available():
        return "wrk"
    _progress("wrk not found (Debian: apt-get install wrk): using the Python load generator, which needs more CPU "
              "per request than wrk, so throughput figures come out lower")
    return "python"


def _progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
