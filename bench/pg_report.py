"""Turn bench/pg.sh's raw pgbench output into a table and a verdict.

    python bench/pg_report.py RESULTS.tsv [--cache CACHE.tsv] [--conditions TEXT]

Each line of RESULTS is ``target workload pgbench-output proxy-cpu% proxy-core% load-core%``
(tab-separated, written by common.sh's measure_end). Each line of CACHE is ``workload
metrics-before metrics-after``: pointsman's /metrics scraped around that workload's measured
run, for the SQL classification cache hit rate during it.

Prints one row per run, the ratios between targets per workload, then the floors of the issue
(on the select-only workload, simple protocol: pointsman >= 0.85x direct and >= 0.95x
pgbouncer), each PASS or FAIL. Exit status 0 when every floor is met (or there is no pointsman
run to judge), 1 otherwise, 2 on unreadable input. Standard library only.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

# bench/report.py: the table layout, the noisy-core warning and the PASS/FAIL list are shared
# with the HTTP and TCP reports (this directory is on sys.path when run as a script).
from report import Verdicts, noise_warnings, read_results, table

# The floors, from the issue: pointsman / direct and pointsman / pgbouncer, on FLOOR_WORKLOAD.
# The other workloads are reported with their ratios but carry no target.
DIRECT_FLOOR = 0.85
PGBOUNCER_FLOOR = 0.95
FLOOR_WORKLOAD = "select"

WORKLOAD_LABEL = {"select": "-S", "select-prepared": "-S -M prepared", "tpcb": "TPC-B-like"}
CACHE_HITS = "pointsman_sql_classify_cache_hits_total"
CACHE_MISSES = "pointsman_sql_classify_cache_misses_total"


@dataclass
class PgbenchResult:
    tps: float
    latency_ms: float
    transactions: int
    failed: int  # "number of failed transactions" (PostgreSQL 15+; 0 when not printed)


def parse_pgbench(text: str) -> PgbenchResult:
    def find(pattern: str) -> re.Match[str]:
        m = re.search(pattern, text, re.MULTILINE)
        if not m:
            raise ValueError(f"pgbench output has no match for {pattern!r}:\n{text}")
        return m

    # pgbench 14+ prints one tps line, "(without initial connection time)"; older ones print
    # two, "including" and "excluding connections establishing": take the excluding one.
    tps = re.search(r"^tps = ([\d.]+) \((?:without initial connection time|excluding)", text, re.MULTILINE)
    if not tps:
        tps = find(r"^tps = ([\d.]+)")
    failed = re.search(r"^number of failed transactions: (\d+)", text, re.MULTILINE)
    return PgbenchResult(
        tps=float(tps.group(1)),
        latency_ms=float(find(r"^latency average = ([\d.]+) ms").group(1)),
        transactions=int(find(r"^number of transactions actually processed: (\d+)").group(1)),
        failed=int(failed.group(1)) if failed else 0,
    )


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format: each metric's samples summed over their labels."""
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{.*\})?\s+(\S+)", line)
        if m:
            try:
                totals[m.group(1)] = totals.get(m.group(1), 0.0) + float(m.group(2))
            except ValueError:
                continue
    return totals


def cache_hit_rate(before: Path, after: Path) -> str:
    """The hit rate between two scrapes, "n/a" when pointsman does not export the counters
    (or no statement was classified in between)."""
    try:
        m0, m1 = parse_metrics(before.read_text()), parse_metrics(after.read_text())
    except OSError:
        return "n/a"
    if CACHE_HITS not in m1 or CACHE_MISSES not in m1:
        return "n/a"
    hits = m1[CACHE_HITS] - m0.get(CACHE_HITS, 0.0)
    misses = m1[CACHE_MISSES] - m0.get(CACHE_MISSES, 0.0)
    if hits + misses <= 0:
        return "n/a"
    # Two decimals: a warm cache sits at 99.9x %, and the digits after the point are the news.
    return f"{100 * hits / (hits + misses):.2f}%"


class PgVerdicts(Verdicts):
    def render(self) -> str:
        return table(["check", "value", "target", "verdict"], self.rows)


def ratio_text(num: PgbenchResult | None, den: PgbenchResult | None) -> str:
    return f"{num.tps / den.tps:.2f}" if num and den and den.tps > 0 else "-"


def report(results: Path, cache: Path | None) -> tuple[str, bool]:
    runs: dict[tuple[str, str], PgbenchResult] = {}
    hit_rates: dict[str, str] = {}
    if cache is not None and cache.exists():
        for workload, before, after in read_results(cache):
            hit_rates[workload] = cache_hit_rate(Path(before), Path(after))

    rows = []
    workloads: list[str] = []
    for target, workload, out, cpu, core_p, core_l in read_results(results):
        r = parse_pgbench(Path(out).read_text())
        runs[(target, workload)] = r
        if workload not in workloads:
            workloads.append(workload)
        rows.append(
            [
                target,
                WORKLOAD_LABEL.get(workload, workload),
                f"{r.tps:,.0f}",
                f"{r.latency_ms:.3f}ms",
                str(r.failed),
                hit_rates.get(workload, "n/a") if target == "pointsman" else "-",
                cpu if cpu == "-" else f"{cpu}%",
                f"{core_p}%",
                f"{core_l}%",
            ]
        )
    headers = ["target", "workload", "tps", "latency", "failed", "cache hits", "proxy CPU", "proxy core", "load core"]
    text = table(headers, rows) + noise_warnings([[r[0], r[1], r[6].rstrip("%"), r[7].rstrip("%")] for r in rows])

    ratio_rows = []
    for workload in workloads:
        direct, hap, bouncer, pm = (runs.get((t, workload)) for t in ("direct", "haproxy", "pgbouncer", "pointsman"))
        ratio_rows.append(
            [
                WORKLOAD_LABEL.get(workload, workload),
                ratio_text(pm, direct),
                ratio_text(pm, bouncer),
                ratio_text(pm, hap),
                ratio_text(bouncer, direct),
                ratio_text(hap, direct),
            ]
        )
    headers = ["tps ratio", "pointsman/direct", "pointsman/pgbouncer", "pointsman/haproxy"]
    text += "\n\n" + table([*headers, "pgbouncer/direct", "haproxy/direct"], ratio_rows)

    v = PgVerdicts()
    for workload in workloads:
        pm = runs.get(("pointsman", workload))
        if pm is not None and pm.failed:
            v.add(f"{WORKLOAD_LABEL.get(workload, workload)}: failed transactions", str(pm.failed), "0", False)
    pm = runs.get(("pointsman", FLOOR_WORKLOAD))
    label = WORKLOAD_LABEL[FLOOR_WORKLOAD]
    for other, floor in (("direct", DIRECT_FLOOR), ("pgbouncer", PGBOUNCER_FLOOR)):
        base = runs.get((other, FLOOR_WORKLOAD))
        if pm and base and base.tps > 0:
            ratio = pm.tps / base.tps
            v.add(f"{label} tps pointsman / {other}", f"{ratio:.2f}", f">= {floor}", ratio >= floor)
    if v.rows:
        text += "\n\n" + v.render()
    else:
        text += "\n\n(no verdict: the floors need pointsman and direct or pgbouncer on the -S workload)"
    return text, v.failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path)
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--conditions", default="")
    args = parser.parse_args()
    try:
        text, failed = report(args.results, args.cache)
    except (OSError, ValueError, KeyError) as exc:
        print(f"pg_report: cannot read the results: {exc}", file=sys.stderr)
        return 2
    print()
    if args.conditions:
        print(args.conditions)
        print()
    print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
