"""``pointsman top`` and the snapshot behind it (``GET /sql/stats``).

Three layers: the frame as a pure function of a snapshot; the snapshot's arithmetic on a
:class:`SqlStats` filled by hand with explicit clock readings; and the real thing, a
``pointsman router`` in front of the test PostgreSQL with ``pointsman top --once`` reading it.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import shutil
import socket
from collections.abc import Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from pointsman import top
from pointsman.cli import build_parser
from pointsman.errors import AdminError
from router.sql_metrics import SQL_DURATION_BUCKETS, SqlStats, _quantile
from tests.pgserver import DATABASE, SUPERUSER, PgServer, clean_env, find_bin_dir
from tests.pointsman.harness import eventually, pointsman, run_cli, write_config

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
    frame = top.render(SNAPSHOT, admin="127.0.0.1:9901", at=AT, interval=1.0)
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
    frame = top.render(SNAPSHOT, admin="a:1", at=AT)
    heading, *rows = frame.splitlines()[5:8]
    # Names start under their heading; numbers end under theirs.
    assert rows[0].index("orders") == heading.index("APP")
    assert rows[1].index("SELECT") == heading.index("VERB")
    assert rows[0].index("1200") + len("1200") == heading.index("TOTAL") + len("TOTAL")
    assert rows[0].endswith("2.100") and len(rows[0]) == len(heading)


def test_render_before_any_traffic() -> None:
    empty = {
        "window_seconds": 0.0,
        "statements": [],
        "denied": [],
        "sessions": [],
        "classify_cache": {"hits": 0, "misses": 0, "hit_rate": None},
    }
    frame = top.render(empty, admin="a:1", at=AT)
    assert "every" not in frame.splitlines()[0]  # a single frame has no refresh period
    assert "rates appear once the router has two samples" in frame
    assert "classify cache: no lookups yet" in frame
    assert "sessions: none open" in frame
    assert "no SQL statements yet" in frame
    assert "no denials" in frame


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
    frame = top.render(many, admin="a:1", at=AT, width=40, height=20, color=True)
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
    code = top.run(("127.0.0.1", 9901), once=True, out=out, err=err, fetch=lambda address, timeout: SNAPSHOT)
    assert code == 0 and err.getvalue() == ""
    assert "orders" in out.getvalue() and "\x1b" not in out.getvalue()  # not a terminal: plain


def test_live_view_shows_errors_retries_and_stops_on_ctrl_c() -> None:
    answers: list[Mapping[str, Any] | BaseException] = [
        AdminError("http://127.0.0.1:9901/sql/stats: cannot reach the admin API: refused"),
        SNAPSHOT,
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
    insert = ("db", "orders", "shop", "INSERT")
    stats.statements.inc(insert, 10)
    stats.statements.inc(("db", "orders", "archive", "INSERT"), 5)  # another database: same row
    stats.denied.inc(("db", "orders", "no-destructive"), 2)

    # One sample: nothing to take a difference from.
    stats.sample(now=100.0)
    snap = stats.snapshot(now=100.2)
    assert snap["window_seconds"] == 0
    assert snap["statements"][0]["total"] == 15 and snap["statements"][0]["rate"] == 0
    assert snap["denied"][0]["rate"] == 0

    for t in (101.0, 102.0, 103.0, 104.0):
        stats.statements.inc(insert, 10)
        stats.denied.inc(("db", "orders", "no-destructive"), 1)
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
    stats.statements.inc(("db", "a", "d", "SELECT"), 500)
    stats.statements.inc(("db", "b", "d", "INSERT"), 1)
    stats.statements.inc(("db", "c", "d", "UPDATE"), 10)
    stats.sample(now=0.0)
    stats.statements.inc(("db", "b", "d", "INSERT"), 30)
    stats.statements.inc(("db", "c", "d", "UPDATE"), 10)
    stats.sample(now=1.0)
    snap = stats.snapshot(now=1.0)
    assert [(r["app"], r["rate"]) for r in snap["statements"]] == [("b", 30.0), ("c", 10.0), ("a", 0.0)]


def test_latency_is_interpolated_inside_the_bucket() -> None:
    stats = SqlStats()
    key = ("db", "orders", "INSERT")
    stats.statements.inc(("db", "orders", "d", "INSERT"), 10)
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

POSTGRES_LISTENER = re.compile(r"pointsman: listener (\S+) postgres (\S+)$")


@pytest.fixture(scope="module")
def pg_server() -> Iterator[PgServer]:
    # The l7 tests' fixture lives in tests/l7/conftest.py; the same rules here (skip on a
    # developer machine without PostgreSQL, fail in CI).
    if find_bin_dir() is None or shutil.which("psql") is None:
        message = "no PostgreSQL server binaries or psql (apt-get install postgresql, or set PG_BIN)"
        if os.environ.get("CI"):
            pytest.fail(f"CI is set and {message}", pytrace=False)
        pytest.skip(message)
    with PgServer() as server:
        yield server


@pytest.fixture
def closed_port() -> Iterator[int]:
    """Bound (so nobody else takes it) but not listening: a connection is refused at once."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


async def test_top_once_shows_the_statements_of_a_real_router(tmp_path: Path, pg_server: PgServer) -> None:
    config = tmp_path / "pointsman.yaml"
    write_config(
        config,
        {
            "admin": {"listen": "127.0.0.1:0"},
            "clusters": {"pg": {"endpoints": [f"127.0.0.1:{pg_server.port}"]}},
            "listeners": [{"name": "db", "listen": "127.0.0.1:0", "protocol": "postgres", "to": "pg"}],
        },
    )
    async with pointsman("router", "--config", str(config)) as running:
        port = next(m.group(2) for line in running.lines if (m := POSTGRES_LISTENER.search(line))).rsplit(":", 1)[1]
        table = f"top_{os.getpid()}"
        statements = [f"CREATE TABLE {table} (id int)", *(f"INSERT INTO {table} VALUES ({i})" for i in range(5))]
        psql = ["psql", "-X", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", port, "-U", SUPERUSER, "-d", DATABASE]
        proc = await asyncio.create_subprocess_exec(
            *psql,
            *(arg for sql in statements for arg in ("-c", sql)),
            env={**clean_env(), "PGAPPNAME": "orders"},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()

        # The sampler runs once a second: wait for a sample after the INSERTs, so the
        # frame shows a rate too, not only the total.
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:

            async def insert_rate_shows() -> bool:
                async with session.get(running.url("/sql/stats")) as response:
                    rows = (await response.json())["statements"]
                return any(r["app"] == "orders" and r["verb"] == "INSERT" and r["rate"] > 0 for r in rows)

            await eventually(insert_rate_shows, timeout=10, what="a rate for the INSERTs")

        code, out, err_text = await run_cli("top", "--once", "--admin", running.admin)
    assert code == 0, err_text
    print(out)  # the frame, for `pytest -s`
    assert out.startswith(f"pointsman top - admin {running.admin} - ")
    assert "sessions: none open" in out  # psql has left
    rows = {(r[0], r[1], r[2]): r for r in _table_rows(out, "LISTENER  APP")}
    insert = rows[("db", "orders", "INSERT")]
    assert insert[4] == "5"  # TOTAL
    assert float(insert[3]) > 0  # RATE/s
    assert all(re.fullmatch(r"\d+\.\d{3}", cell) for cell in insert[5:8])  # mean, p50, p99 in ms
    assert rows[("db", "orders", "CREATE")][4] == "1"
    assert "\x1b" not in out  # a pipe gets no escape codes


async def test_top_once_against_an_unreachable_instance(closed_port: int) -> None:
    code, out, err = await run_cli("top", "--once", "--admin", f"127.0.0.1:{closed_port}")
    assert code == 1
    assert out == ""
    assert err.count("\n") == 1
    assert f"http://127.0.0.1:{closed_port}/sql/stats: cannot reach the admin API" in err
