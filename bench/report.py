"""Turn the raw output of a benchmark run into a table and a verdict.

    python bench/report.py http RESULTS.tsv [--conditions TEXT]
    python bench/report.py tcp RESULTS.tsv [--conditions TEXT]

``http``: each line of RESULTS is ``target case wrk-output proxy-cpu% proxy-core% load-core%``
(tab-separated), written by bench/http.sh. ``tcp``: ``target direction json proxy-cpu%
proxy-core% load-core%``, written by bench/tcp.sh; the JSON is bench/bulk.py's or iperf3's.

Prints one row per run, then the ratios pointsman/HAProxy against the targets of the issue,
each PASS or FAIL. Exit status 0 when every target is met, 1 otherwise (2 on unreadable input).
Standard library only, so it runs with any python3.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

# The targets, from the issue. "floor" ratios are pointsman/HAProxy and must be >= the value;
# the p99 ratio must be <= its ceiling.
SMALL_RPS_FLOOR = 0.5
SMALL_RPS_GOAL = 0.8
P99_CEILING = 2.0
LARGE_THROUGHPUT_FLOOR = 0.7
TCP_FLOOR = 1.0

_TIME_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
# wrk prints sizes in binary units (its format_binary: 1024-based) with these suffixes.
_SIZE_UNITS = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}


def parse_time(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if not m:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(m.group(1)) * _TIME_UNITS[m.group(2)]


def parse_size(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(B|KB|MB|GB|TB)", text.strip())
    if not m:
        raise ValueError(f"not a wrk size: {text!r}")
    return float(m.group(1)) * _SIZE_UNITS[m.group(2)]


@dataclass
class WrkResult:
    rps: float
    bytes_per_s: float
    p50: float
    p99: float
    requests: int
    errors: int  # socket errors (connect, read, write, timeout) + non-2xx/3xx responses


def parse_wrk(text: str) -> WrkResult:
    def find(pattern: str) -> re.Match[str]:
        m = re.search(pattern, text, re.MULTILINE)
        if not m:
            raise ValueError(f"wrk output has no match for {pattern!r}:\n{text}")
        return m

    rps = float(find(r"^Requests/sec:\s+([\d.]+)").group(1))
    transfer = parse_size(find(r"^Transfer/sec:\s+(\S+)").group(1))
    p50 = parse_time(find(r"^\s+50%\s+(\S+)").group(1))
    p99 = parse_time(find(r"^\s+99%\s+(\S+)").group(1))
    requests = int(find(r"^\s+(\d+) requests in").group(1))
    errors = 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        errors += sum(int(g) for g in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if m:
        errors += int(m.group(1))
    return WrkResult(rps, transfer, p50, p99, requests, errors)


def fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f}us"
    if seconds < 1.0:
        return f"{seconds * 1e3:.2f}ms"
    return f"{seconds:.2f}s"


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        # First column left-aligned (names), the rest right-aligned (numbers).
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(row) for row in rows)])


def read_results(path: Path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text().splitlines() if line.strip()]


# A core this much busier than our process on it kept it means another job used that core.
NOISE_POINTS = 15


def noise_warnings(rows: list[list[str]]) -> str:
    """Say which runs shared the proxy's core with something else, so nobody trusts them blindly.

    ``rows`` are ``[target, case, proxy_cpu, proxy_core_busy]``; ``proxy_cpu`` is ``-`` for
    the direct runs, which do not use the proxy core (so it tells nothing about them)."""
    noisy = []
    for target, case, cpu, core in rows:
        if cpu != "-" and int(core) - int(cpu) > NOISE_POINTS:
            noisy.append(f"{target} {case} (proxy core {core}% busy, the proxy itself {cpu}%)")
    if not noisy:
        return ""
    return (
        "\n\nWARNING: another process used the proxy's core during: "
        + "; ".join(noisy)
        + ".\nThose numbers are low by an unknown amount: rerun on an idle machine before trusting them."
    )


class Verdicts:
    def __init__(self) -> None:
        self.rows: list[list[str]] = []
        self.failed = False

    def add(self, what: str, value: str, target: str, ok: bool, note: str = "") -> None:
        self.rows.append([what, value, target, ("PASS" if ok else "FAIL") + (f" ({note})" if note else "")])
        self.failed |= not ok

    def render(self) -> str:
        return table(["pointsman / HAProxy", "value", "target", "verdict"], self.rows)


def report_http(results: Path) -> tuple[str, bool]:
    runs: dict[tuple[str, str], tuple[WrkResult, list[str]]] = {}
    rows = []
    case_label = {"small": "13 B", "large": "1 MiB"}
    for target, case, out, cpu, core_p, core_l in read_results(results):
        r = parse_wrk(Path(out).read_text())
        runs[(target, case)] = (r, [cpu, core_p, core_l])
        rows.append(
            [
                target,
                case_label.get(case, case),
                f"{r.rps:,.0f}",
                fmt_time(r.p50),
                fmt_time(r.p99),
                f"{r.bytes_per_s / 1024**2:,.1f}",
                str(r.errors),
                cpu if cpu == "-" else f"{cpu}%",
                f"{core_p}%",
                f"{core_l}%",
            ]
        )
    headers = ["target", "response", "req/s", "p50", "p99", "MiB/s", "errors", "proxy CPU", "proxy core", "load core"]
    text = table(headers, rows) + noise_warnings([[r[0], r[1], r[7].rstrip("%"), r[8].rstrip("%")] for r in rows])

    v = Verdicts()
    for case in ("small", "large"):
        pm = runs.get(("pointsman", case))
        if pm is not None and pm[0].errors:
            v.add(f"{case_label[case]}: errors", str(pm[0].errors), "0", False, "socket errors or non-2xx")
    hs, ps = runs.get(("haproxy", "small")), runs.get(("pointsman", "small"))
    if hs and ps:
        ratio = ps[0].rps / hs[0].rps
        v.add(
            "13 B req/s",
            f"{ratio:.2f}",
            f">= {SMALL_RPS_FLOOR} (goal {SMALL_RPS_GOAL})",
            ratio >= SMALL_RPS_FLOOR,
            "goal met" if ratio >= SMALL_RPS_GOAL else "below goal",
        )
        ratio = ps[0].p99 / hs[0].p99
        v.add("13 B p99 latency", f"{ratio:.2f}", f"<= {P99_CEILING}", ratio <= P99_CEILING)
    hl, pl = runs.get(("haproxy", "large")), runs.get(("pointsman", "large"))
    if hl and pl:
        ratio = pl[0].bytes_per_s / hl[0].bytes_per_s
        v.add("1 MiB throughput", f"{ratio:.2f}", f">= {LARGE_THROUGHPUT_FLOOR}", ratio >= LARGE_THROUGHPUT_FLOOR)
    if v.rows:
        text += "\n\n" + v.render()
    else:
        text += "\n\n(no ratios: the run needs both haproxy and pointsman)"
    return text, v.failed


@dataclass
class BulkResult:
    bytes_per_s: float


def parse_bulk(text: str) -> BulkResult:
    """bench/bulk.py's one JSON line, or iperf3's --json document (received bytes count)."""
    data = json.loads(text)
    if "error" in data:
        raise ValueError(f"the transfer failed: {data['error']}")
    if data.get("tool") == "bulk":
        return BulkResult(float(data["bytes_per_second"]))
    return BulkResult(data["end"]["sum_received"]["bits_per_second"] / 8)


def report_tcp(results: Path) -> tuple[str, bool]:
    runs: dict[tuple[str, str], BulkResult] = {}
    rows = []
    label = {"up": "client->server", "down": "server->client"}
    for target, direction, out, cpu, core_p, core_l in read_results(results):
        r = parse_bulk(Path(out).read_text())
        runs[(target, direction)] = r
        # GB moved per second of the proxy's CPU: comparable even when a run was limited by
        # the load core rather than by the proxy (proxy CPU well under 100%).
        per_cpu = "-" if cpu == "-" or int(cpu) <= 0 else f"{r.bytes_per_s / 1e9 / (int(cpu) / 100):.2f}"
        rows.append(
            [
                target,
                label.get(direction, direction),
                f"{r.bytes_per_s / 1e9:.2f}",
                f"{r.bytes_per_s * 8 / 1e9:.1f}",
                cpu if cpu == "-" else f"{cpu}%",
                per_cpu,
                f"{core_p}%",
                f"{core_l}%",
            ]
        )
    headers = ["target", "direction", "GB/s", "Gbit/s", "proxy CPU", "GB/CPU-s", "proxy core", "load core"]
    text = table(headers, rows) + noise_warnings([[r[0], r[1], r[4].rstrip("%"), r[6].rstrip("%")] for r in rows])
    v = Verdicts()
    for direction in ("up", "down"):
        h, p = runs.get(("haproxy", direction)), runs.get(("pointsman", direction))
        if h and p:
            ratio = p.bytes_per_s / h.bytes_per_s
            v.add(f"bulk {label[direction]}", f"{ratio:.2f}", f">= {TCP_FLOOR}", ratio >= TCP_FLOOR)
    if v.rows:
        text += "\n\n" + v.render()
    else:
        text += "\n\n(no ratios: the run needs both haproxy and pointsman)"
    return text, v.failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["http", "tcp"])
    parser.add_argument("results", type=Path)
    parser.add_argument("--conditions", default="")
    args = parser.parse_args()
    try:
        text, failed = (report_http if args.kind == "http" else report_tcp)(args.results)
    except (OSError, ValueError, KeyError) as exc:
        print(f"report: cannot read the results: {exc}", file=sys.stderr)
        return 2
    print()
    if args.conditions:
        print(args.conditions)
        print()
    print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
