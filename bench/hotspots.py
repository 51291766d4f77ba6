"""Where the in-process request path spends its time: cProfile over repeated requests of one tier.

    python -m bench.hotspots --tier heavy [--runs 10] [--top 25] [--save heavy.prof]

Prints the functions with the largest cumulative time and the largest own time, each as a share of the
profiled total. The app, its warm-up and the request body are as in ``bench.run``'s in-process section; the
profiler itself slows pure-Python code more than C code, so shares matter more than absolute times.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as ``python bench/hotspots.py``: import from the repository
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import cProfile  # noqa: E402
import pstats  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402

from bench.inprocess import check_answer, invoke, local_app  # noqa: E402
from bench.payloads import TIERS, build_request, request_body  # noqa: E402
from bench.report import table  # noqa: E402
from bench.servers import ROOT  # noqa: E402


@dataclass(frozen=True)
class Hotspot:
    """One function's share of the profiled time."""

    function: str
    location: str
    calls: int
    own_share: float
    cumulative_share: float


def profile_tier(tier: str, runs: int) -> pstats.Stats:
    """cProfile statistics of ``runs`` in-process requests of ``tier`` (after two warm-up requests)."""
    body = request_body(build_request(TIERS[tier]))
    with tempfile.TemporaryDirectory(prefix="neutropenia-hotspots-") as work_dir, \
            local_app(Path(work_dir), "hotspots") as app:
        client = app.test_client()
        for _ in range(2):
            check_answer(*invoke(client, body), what=f"{tier} (warm-up)", want_cards=True)
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(runs):
            invoke(client, body)
        profiler.disable()
    return pstats.Stats(profiler)


def hotspots(stats: pstats.Stats) -> list[Hotspot]:
    """Every profiled function with its own and cumulative share of the time of the outermost call."""
    entries = stats.stats.items()  # type: ignore[attr-defined]
    total = max(cumulative for _, (_, _, _, cumulative, _) in entries)
    return [Hotspot(name, f"{_short(filename)}:{line}", calls, own / total, cumulative / total)
            for (filename, line, name), (_, calls, own, cumulative, _) in entries]


def format_hotspots(rows: Sequence[Hotspot], top: int) -> str:
    """Two tables: the ``top`` functions by cumulative share, and by own share."""
    def render(ordered: Sequence[Hotspot]) -> str:
        return table(["function", "file:line", "calls", "cumulative", "own"],
                     [[r.function, r.location, r.calls, f"{r.cumulative_share:.1%}", f"{r.own_share:.1%}"]
                      for r in ordered[:top]])

    by_cumulative = sorted(rows, key=lambda r: r.cumulative_share, reverse=True)
    by_own = sorted(rows, key=lambda r: r.own_share, reverse=True)
    return f"By cumulative time\n{render(by_cumulative)}\n\nBy own time\n{render(by_own)}\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Profile one tier and print its hotspots."""
    parser = argparse.ArgumentParser(prog="python -m bench.hotspots", description=__doc__.splitlines()[0])
    parser.add_argument("--tier", choices=sorted(TIERS), default="heavy")
    parser.add_argument("--runs", type=int, default=10, help="profiled requests (default 10)")
    parser.add_argument("--top", type=int, default=25, help="rows per table (default 25)")
    parser.add_argument("--save", type=Path, metavar="FILE", help="also save the raw profile (pstats format)")
    args = parser.parse_args(argv)
    stats = profile_tier(args.tier, args.runs)
    if args.save:
        stats.dump_stats(args.save)
    print(f"{args.tier}: {args.runs} requests, {stats.total_tt:.3f} s profiled")  # type: ignore[attr-defined]
    sys.stdout.write(format_hotspots(hotspots(stats), args.top))
    return 0


def _short(filename: str) -> str:
    """A path relative to the repository or to site-packages, for reading at a glance."""
    if filename.startswith(str(ROOT)):
        filename = filename[len(str(ROOT)) + 1:]
    return filename.split("site-packages/")[-1]


if __name__ == "__main__":
    raise SystemExit(main())
