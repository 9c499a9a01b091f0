"""``pointsman top`` and the snapshots behind it (``GET /sql/stats``, ``GET /http/stats``).

Two layers here: the frame as a pure function of the snapshots, and the SQL snapshot's
arithmetic on a :class:`SqlStats` filled by hand with explicit clock readings (the HTTP one's
is in tests/router/test_http_stats.py). The real thing is in test_top_live.py.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import pytest

from pointsman import top
from pointsman.cli import build_parser
from pointsman.errors import AdminError
from router.sql_metrics import SQL_DURATION_BUCKETS, SqlStats, _quantile

AT = datetime(2024, 5, 1, 12, 0, 3)

SNAPSHOT: dict[str, Any] = {
    "window_seconds": 5.0,
    # Deliberately not in rate order: render sorts by itself.
    "statements": [
        {
            "listener": "db",
            "app": "billing",
            "verb": "SELECT",
            "total": 40.0,
            "rate": 2.0,
            "mean_ms": 1.5,
            "p50_ms": 0.75,
            "p99_ms": 9.9,
        },
        {
            "listener": "db",
            "app": "orders",
            "verb": "INSERT",
            "total": 1200.0,
            "rate": 120.5,
            "mean_ms": 0.412,
            "p50_ms": 0.35,
            "p99_ms": 2.1,
        },
        {
            "listener": "db",
            "app": "",
            "verb": "BEGIN",
            "total": 3.0,
            "rate": 0.0,
            "mean_ms": None,
            "p50_ms": None,
            "p99_ms": None,
        },
    ],
    "denied": [
        {"listener": "db", "app": "orders", "rule": "no-destructive", "total": 7.0, "rate": 0.4},
    ],
    "sessions": [
        {"listener": "db", "app": "orders", "active": 3.0},
        {"listener": "db2", "app": "orders", "active": 1.0},
        {"listener": "db", "app": "billing", "active": 1.0},
        {"listener": "db", "app": "gone", "active": 0.0},
    ],
    "classify_cache": {"hits": 987, "misses": 13, "hit_rate": 0.987},
}

HTTP_SNAPSHOT: dict[str, Any] = {
    "window_seconds": 5.0,
    # Not in rate order either.
    "routes": [
        {
            "listener": "web",
            "route": "",  # no route matched (404s)
            "cluster": "",
            "total": 4.0,
            "rate": 0.2,
            "error_rate": 0.0,
            "mean_ms": 0.1,
            "p50_ms": 0.05,
            "p99_ms": 0.2,
        },
        {
            "listener": "web",
            "route": "api",
            "cluster": "api-v1",
            "total": 5000.0,
            "rate": 250.0,
            "error_rate": 2.5,
            "mean_ms": 3.25,
            "p50_ms": 2.5,
            "p99_ms": 48.0,
        },
        {
            "listener": "web",
            "route": "static",
            "cluster": "files",
            "total": 90.0,
            "rate": 0.0,
            "error_rate": 0.0,
            "mean_ms": None,  # nothing completed in the window
            "p50_ms": None,
            "p99_ms": None,
        },
    ],
    "listeners": [{"listener": "web", "active_connections": 12, "rejected_total": 3.0, "rejected_rate": 0.0}],
    "clusters": [
        {"cluster": "api-v1", "in_flight": 7, "connections": 9, "overflow_total": 2.0, "overflow_rate": 0.4},
        {"cluster": "files", "in_flight": 0, "connections": 1, "overflow_total": 0.0, "overflow_rate": 0.0},
    ],
}


def _table_rows(frame: str, heading: str) -> list[list[str]]:
    """The rows under the table whose heading line starts with ``heading``, split on runs of
    spaces (no cell of these tests holds a space), up to the next blank line."""
    lines = frame.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    rows: list[list[str]] = []
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        rows.append(line.split())
    return rows


# -- render: a pure function ------------------------------------------------------------------


def test_render_a_frame() -> None:
    frame = top.render({"sql": SNAPSHOT}, admin="127.0.0.1:9901", at=AT, interval=1.0)
    lines = frame.splitlines()
    assert lines[0] == "pointsman top - admin 127.0.0.1:9901 - 2024-05-01 12:00:03 - every 1s"
    assert lines[1] == "window 5.0s   statements 122.5/s   denied 0.4/s"
    assert lines[2] == "classify cache: 98.7% hits (987 hits, 13 misses)"
    # Per app over both listeners, busiest first; an app with none open is left out.
    assert lines[3] == "sessions: 5 open: orders 4, billing 1"

    assert lines[5].split() == list(top.STATEMENT_COLUMNS)
    assert _table_rows(frame, "LISTENER  APP") == [
        ["db", "orders", "INSERT", "120.5", "1200", "0.412", "0.350", "2.100"],
        ["db", "billing", "SELECT", "2.0", "40", "1.500", "0.750", "9.900"],
        ["db", "-", "BEGIN", "0.0", "3", "-", "-", "-"],  # no app name, nothing timed
    ]
    denial_heading = next(line for line in lines if "RULE" in line)
    assert denial_heading.split() == list(top.DENIAL_COLUMNS)
    assert _table_rows(frame, denial_heading) == [["db", "orders", "no-destructive", "7", "0.4"]]
    assert "\x1b" not in frame


def test_render_aligns_columns() -> None:
    frame = top.render({"sql": SNAPSHOT}, admin="a:1", at=AT)
    heading, *rows = frame.splitlines()[5:8]
    # Names start under their heading; numbers end under theirs.
    assert rows[0].index("orders") == heading.index("APP")
    assert rows[1].index("SELECT") == heading.index("VERB")
    assert rows[0].index("1200") + len("1200") == heading.index("TOTAL") + len("TOTAL")
    assert rows[0].endswith("2.100") and len(rows[0]) == len(heading)


def test_render_before_any_traffic() -> None:
    sql = {
        "window_seconds": 0.0,
        "statements": [],
        "denied": [],
        "sessions": [{"listener": "db", "app": "gone", "active": 0.0}],
        "classify_cache": {"hits": 0, "misses": 0, "hit_rate": None},
    }
    http = {"window_seconds": 0.0, "routes": [], "listeners": [], "clusters": []}
    frame = top.render({"sql": sql, "http": http}, admin="a:1", at=AT)
    assert "every" not in frame.splitlines()[0]  # a single frame has no refresh period
    # Each section without traffic is one line.
    assert frame.splitlines()[1:] == ["no SQL traffic", "", "no HTTP traffic"]


def test_render_sessions_before_statements() -> None:
    sql = {
        "window_seconds": 0.0,
        "statements": [],
        "denied": [],
        "sessions": [{"listener": "db", "app": "orders", "active": 1.0}],
        "classify_cache": {"hits": 0, "misses": 0, "hit_rate": None},
    }
    frame = top.render({"sql": sql}, admin="a:1", at=AT)
    assert "rates appear once the router has two samples" in frame
    assert "classify cache: no lookups yet" in frame
    assert "sessions: 1 open: orders 1" in frame
    assert "no SQL statements yet" in frame
    assert "no denials" in frame


def test_render_the_http_section() -> None:
    frame = top.render({"sql": SNAPSHOT, "http": HTTP_SNAPSHOT}, admin="a:1", at=AT)
    lines = frame.splitlines()
    # The SQL section as before, then the HTTP one below it.
    assert lines[1] == "window 5.0s   statements 122.5/s   denied 0.4/s"
    start = lines.index("window 5.0s   requests 250.2/s   5xx 2.5/s")
    assert lines[start - 1] == ""
    assert lines[start + 1] == (
        "connections: 12 open   in flight: api-v1 7   overflow 503s: api-v1 2 (0.4/s)   refused before routing: web 3"
    )
    assert lines[start + 3].split() == list(top.HTTP_COLUMNS)
    assert _table_rows(frame, "LISTENER  ROUTE") == [
        ["web", "api", "api-v1", "250.0", "2.5", "5000", "3.250", "2.500", "48.000"],
        ["web", "-", "-", "0.2", "0.0", "4", "0.100", "0.050", "0.200"],  # no route matched
        ["web", "static", "files", "0.0", "0.0", "90", "-", "-", "-"],
    ]
    heading = lines[start + 3]
    row = lines[start + 4]
    assert row.index("api-v1") == heading.index("CLUSTER")
    assert row.endswith("48.000") and len(row) == len(heading)

    # With colour, the route answering 5xx is red.
    colored = top.render({"http": HTTP_SNAPSHOT}, admin="a:1", at=AT, color=True)
    red = [line for line in colored.splitlines() if line.startswith("\x1b[31m")]
    assert len(red) == 1 and "api-v1" in red[0]


def test_render_one_section_without_traffic() -> None:
    idle_sql = {"window_seconds": 5.0, "statements": [], "denied": [], "sessions": [], "classify_cache": {}}
    frame = top.render({"sql": idle_sql, "http": HTTP_SNAPSHOT}, admin="a:1", at=AT)
    lines = frame.splitlines()
    assert lines[1:4] == ["no SQL traffic", "", "window 5.0s   requests 250.2/s   5xx 2.5/s"]
    # An instance that serves no /http/stats (older): the SQL view alone, no HTTP line.
    frame = top.render({"sql": SNAPSHOT, "http": None}, admin="a:1", at=AT)
    assert "HTTP" not in frame and "ROUTE" not in frame and "INSERT" in frame
    # Before two samples the HTTP section has totals, and says why rates are 0.
    fresh = {**HTTP_SNAPSHOT, "window_seconds": 0.0}
    frame = top.render({"http": fresh}, admin="a:1", at=AT)
    assert frame.splitlines()[1].startswith("window -   rates appear once")


def test_render_shares_the_height_between_tables() -> None:
    sql = dict(SNAPSHOT)
    sql["statements"] = [
        {"listener": "db", "app": f"app{i:02d}", "verb": "SELECT", "total": 100 - i, "rate": 0.0} for i in range(30)
    ]
    http = dict(HTTP_SNAPSHOT)
    http["routes"] = [
        {"listener": "web", "route": f"r{i:02d}", "cluster": "c", "total": 100 - i, "rate": 0.0} for i in range(30)
    ]
    frame = top.render({"sql": sql, "http": http}, admin="a:1", at=AT, height=40)
    lines = frame.splitlines()
    assert len(lines) == 40
    assert "app00" in frame and "r00" in frame
    more = [line for line in lines if line.startswith("... ")]
    assert len(more) == 2  # each table says how many it left out
    assert "no-destructive" in frame  # the denials stay
    # A small table is shown whole; the big one gets the rest.
    http["routes"] = http["routes"][:3]
    lines = top.render({"sql": sql, "http": http}, admin="a:1", at=AT, height=40).splitlines()
    assert len(lines) == 40 and "r02" in "\n".join(lines)
    assert len([line for line in lines if line.startswith("... ")]) == 1


def test_render_an_error_frame() -> None:
    frame = top.render(None, admin="a:1", at=AT, interval=2.0, error="connection refused", color=True)
    lines = frame.splitlines()
    assert len(lines) == 2
    assert lines[1] == "\x1b[1m\x1b[31merror: connection refused\x1b[0m"
    # On a narrow terminal the error wraps: its end says why.
    frame = top.render(None, admin="a:1", at=AT, error="http://a:1/sql/stats: cannot reach: refused", width=24)
    wrapped = frame.splitlines()[1:]
    assert len(wrapped) > 1 and all(len(line) <= 24 for line in wrapped)
    assert " ".join(wrapped).replace(" ", "") == "error:http://a:1/sql/stats:cannotreach:refused"


def test_render_fits_the_terminal() -> None:
    many = dict(SNAPSHOT)
    many["statements"] = [
        {"listener": "db", "app": f"app{i:02d}", "verb": "SELECT", "total": 100 - i, "rate": 0.0} for i in range(30)
    ]
    frame = top.render({"sql": many}, admin="a:1", at=AT, width=40, height=20, color=True)
    plain = re.sub(r"\x1b\[[0-9;]*m", "", frame)
    assert len(plain.splitlines()) <= 20
    assert all(len(line) <= 40 for line in plain.splitlines())
    assert any(len(line) == 40 for line in plain.splitlines())  # the title was cut
    # The busiest rows stay; the rest are counted; the denials are never dropped.
    assert "app00" in plain and "app29" not in plain
    assert re.search(r"^\.\.\. \d+ more", plain, re.M)
    assert "no-destructive" in plain
    # Cut before styling: every escape sequence is whole.
    assert "\x1b[7mLISTENER" in frame
    assert not re.search(r"\x1b(?!\[[0-9;]*m)", frame)


# -- the loop, with fetch and sleep replaced ----------------------------------------------------


def test_once_prints_a_frame() -> None:
    out, err = io.StringIO(), io.StringIO()
    code = top.run(
        ("127.0.0.1", 9901),
        once=True,
        out=out,
        err=err,
        fetch=lambda address, timeout: {"sql": SNAPSHOT, "http": HTTP_SNAPSHOT},
    )
    assert code == 0 and err.getvalue() == ""
    assert "orders" in out.getvalue() and "\x1b" not in out.getvalue()  # not a terminal: plain


def test_live_view_shows_errors_retries_and_stops_on_ctrl_c() -> None:
    answers: list[Mapping[str, Any] | BaseException] = [
        AdminError("http://127.0.0.1:9901/sql/stats: cannot reach the admin API: refused"),
        {"sql": SNAPSHOT, "http": None},
        KeyboardInterrupt(),
    ]

    def fetch(address: tuple[str, int], timeout: float) -> Mapping[str, Any]:
        answer = answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    sleeps: list[float] = []
    out = io.StringIO()
    code = top.run(("127.0.0.1", 9901), interval=0.5, out=out, err=io.StringIO(), fetch=fetch, sleep=sleeps.append)
    assert code == 0
    assert len(sleeps) == 2 and all(0 <= s <= 0.5 for s in sleeps)
    # Into a pipe: plain frames, one blank line between them.
    first, second = out.getvalue().rstrip("\n").split("\n\n", 1)
    assert "error: http://127.0.0.1:9901/sql/stats: cannot reach the admin API: refused (retrying every 0.5s)" in first
    assert "INSERT" not in first
    assert "error" not in second and "INSERT" in second


def test_interval_is_checked() -> None:
    parser = build_parser()
    assert parser.parse_args(["top"]).interval == 1.0
    assert parser.parse_args(["top", "--interval", "0.25"]).interval == 0.25
    for bad in ("0", "-1", "soon"):
        with pytest.raises(SystemExit):
            parser.parse_args(["top", "--interval", bad])


# -- the snapshot's arithmetic -----------------------------------------------------------------


def test_rates_come_from_the_samples() -> None:
    stats = SqlStats()
    insert = ("db", "postgres", "orders", "", "", "", "shop", "INSERT")
    stats.statements.inc(insert, 10)
    stats.statements.inc(("db", "postgres", "orders", "", "", "", "archive", "INSERT"), 5)  # another database: same row
    stats.denied.inc(("db", "postgres", "orders", "", "", "", "no-destructive"), 2)

    # One sample: nothing to take a difference from.
    stats.sample(now=100.0)
    snap = stats.snapshot(now=100.2)
    assert snap["window_seconds"] == 0
    assert snap["statements"][0]["total"] == 15 and snap["statements"][0]["rate"] == 0
    assert snap["denied"][0]["rate"] == 0

    for t in (101.0, 102.0, 103.0, 104.0):
        stats.statements.inc(insert, 10)
        stats.denied.inc(("db", "postgres", "orders", "", "", "", "no-destructive"), 1)
        stats.sample(now=t)
    stats.statements.inc(insert, 1000)  # after the last sample: in the total, not yet in the rate
    snap = stats.snapshot(window=5.0, now=104.5)
    assert snap["window_seconds"] == 4.0
    [row] = snap["statements"]
    assert row == {
        "listener": "db",
        "app": "orders",
        "verb": "INSERT",
        "total": 1055,
        "rate": 10.0,  # 40 more between t=100 and t=104
        "mean_ms": None,  # no duration observed
        "p50_ms": None,
        "p99_ms": None,
    }
    assert snap["denied"] == [{"listener": "db", "app": "orders", "rule": "no-destructive", "total": 6, "rate": 1.0}]

    # A shorter window reaches back to t=102 only: 20 in 2 s.
    assert stats.snapshot(window=2.0, now=104.5)["statements"][0]["rate"] == 10.0
    assert stats.snapshot(window=2.0, now=104.5)["window_seconds"] == 2.0
    # Samples taken "after" now are not used (and the rate is as of t=102).
    assert stats.snapshot(window=5.0, now=102.0)["window_seconds"] == 2.0
    # A sampler that stopped longer ago than the window gives no rates rather than old ones.
    stale = stats.snapshot(window=5.0, now=120.0)
    assert stale["window_seconds"] == 0 and stale["statements"][0]["rate"] == 0


def test_statements_sorted_by_rate_then_total() -> None:
    stats = SqlStats()
    stats.statements.inc(("db", "postgres", "a", "", "", "", "d", "SELECT"), 500)
    stats.statements.inc(("db", "postgres", "b", "", "", "", "d", "INSERT"), 1)
    stats.statements.inc(("db", "postgres", "c", "", "", "", "d", "UPDATE"), 10)
    stats.sample(now=0.0)
    stats.statements.inc(("db", "postgres", "b", "", "", "", "d", "INSERT"), 30)
    stats.statements.inc(("db", "postgres", "c", "", "", "", "d", "UPDATE"), 10)
    stats.sample(now=1.0)
    snap = stats.snapshot(now=1.0)
    assert [(r["app"], r["rate"]) for r in snap["statements"]] == [("b", 30.0), ("c", 10.0), ("a", 0.0)]


def test_latency_is_interpolated_inside_the_bucket() -> None:
    stats = SqlStats()
    key = ("db", "postgres", "orders", "", "", "", "INSERT")
    stats.statements.inc(("db", "postgres", "orders", "", "", "", "d", "INSERT"), 10)
    # Ten statements in the (0.5 ms, 1 ms] bucket.
    for _ in range(10):
        stats.durations.observe(key, 0.0008)
    [row] = stats.snapshot(now=0.0)["statements"]
    assert row["mean_ms"] == 0.8
    assert row["p50_ms"] == 0.75  # rank 5 of 10: halfway through the bucket, not its 1 ms bound
    assert row["p99_ms"] == 0.995  # rank 9.9 of 10


def test_quantile_like_histogram_quantile() -> None:
    buckets = SQL_DURATION_BUCKETS
    counts = [0.0] * (len(buckets) + 1)
    counts[0] = 50  # (0, 0.1 ms]: the first bucket starts at 0
    counts[9] = 50  # (50 ms, 100 ms]
    assert _quantile(counts, buckets, 100, 0.5) == 0.1  # rank 50 ends the first bucket
    assert _quantile(counts, buckets, 100, 0.25) == 0.05
    assert _quantile(counts, buckets, 100, 0.99) == 99.0  # 50 + 50 * 49/50
    # In the +Inf bucket: the highest finite bound, as Prometheus gives it.
    counts[-1] = 900
    assert _quantile(counts, buckets, 1000, 0.99) == 10000.0
    assert _quantile(counts, buckets, 0, 0.5) is None


def test_cache_hit_rate_counts_both_classifiers() -> None:
    # Set by hand: what counts as a hit is the classifier's business, the sum is ours.
    stats = SqlStats()
    stats.classifier.cache.hits, stats.classifier.cache.misses = 5, 1
    stats.classifier_bs.cache.hits, stats.classifier_bs.cache.misses = 1, 1
    cache = stats.snapshot(now=0.0)["classify_cache"]
    assert cache == {"hits": 6, "misses": 2, "hit_rate": 0.75}


# -- end to end: a real router in front of a real PostgreSQL -------------------------------------
