"""The postgres listener against a real server, with real clients: counting and policy."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from zoneinfo import ZoneInfo

import asyncpg
import psycopg
import pytest

from tests.l7.pg_helpers import DENY_DESTRUCTIVE, count_rows, direct, new_table, pg_proxy, psql, run
from tests.pgserver import DATABASE, PgServer, pgbench_init, pgbench_path

# --- counting ----------------------------------------------------------------------------------


async def test_psql_statements_are_counted_per_app_and_verb(pg_server: PgServer) -> None:
    table = await new_table(pg_server)
    async with pg_proxy(pg_server) as proxy:
        code, out, err = await psql(
            proxy,
            f"INSERT INTO {table} VALUES (10); INSERT INTO {table} VALUES (11)",
            f"SELECT count(*) FROM {table}",
            f"UPDATE {table} SET a = a + 1 WHERE a > 10",
        )
        assert code == 0, err
        assert "5" in out
        assert proxy.counter("statements", app="psql", verb="INSERT", database=DATABASE) == 2
        assert proxy.counter("statements", app="psql", verb="SELECT") == 1
        assert proxy.counter("statements", app="psql", verb="UPDATE") == 1
        assert proxy.counter("sessions", app="psql") == 1  # psql runs every -c in one session


async def test_pgbench_tpcb_counts_exactly(pg_server: PgServer) -> None:
    await asyncio.to_thread(pgbench_init, pg_server, 1)
    async with pg_proxy(pg_server, [DENY_DESTRUCTIVE | {"match": {"verbs": ["DROP"]}}]) as proxy:
        for mode in ("simple", "prepared", "extended"):
            code, out, err = await run(
                pgbench_path(pg_server), "-n", "-h", "127.0.0.1", "-p", str(proxy.port), "-U", "postgres",
                "-c", "2", "-j", "2", "-t", "50", "-M", mode, DATABASE,
            )  # fmt: skip
            assert code == 0, out + err
        n = 3 * 2 * 50  # three modes, two clients, 50 transactions each
        assert proxy.counter("statements", app="pgbench", verb="UPDATE") == 3 * n
        assert proxy.counter("statements", app="pgbench", verb="INSERT") == n
        # Besides each transaction's SELECT, pgbench's setup connection runs two SELECTs a run
        # (the scale from pgbench_branches, the partitioning of pgbench_accounts).
        assert proxy.counter("statements", app="pgbench", verb="SELECT") == n + 2 * 3
        assert proxy.counter("statements", app="pgbench", verb="BEGIN") == n
        assert proxy.counter("statements", app="pgbench", verb="COMMIT") == n
        assert proxy.counter("transactions", app="pgbench", outcome="committed") == n
        assert proxy.counter("denied") == 0
        # Every statement got a latency: the histogram saw as many as were counted.
        assert proxy.router.sql_stats.durations.count(("db", "postgres", "pgbench", "", "", "", "UPDATE")) == 3 * n


# --- deny ----------------------------------------------------------------------------------------


async def test_denied_statement_in_a_multi_statement_string_runs_none(
    pg_server: PgServer, caplog: pytest.LogCaptureFixture
) -> None:
    table = await new_table(pg_server, rows=3)
    async with pg_proxy(pg_server, [DENY_DESTRUCTIVE]) as proxy:
        with caplog.at_level("INFO", logger="pointsman.sql.policy"):
            code, _, err = await psql(proxy, f"INSERT INTO {table} VALUES (4); DELETE FROM {table}")
        line = next(r.getMessage() for r in caplog.records if r.name == "pointsman.sql.policy")
        assert '"verbs":["INSERT","DELETE"]' in line and f'"tables":["{table}"]' in line, line
        assert '"decision":"deny"' in line and '"rule":"no-destructive"' in line
        assert code != 0
        assert "no-destructive" in err and "denied" in err
        assert "PL/pgSQL" not in err  # the error reads as a refusal, not as the DO block behind it
        assert await count_rows(pg_server, table) == 3  # not even the INSERT ran
        assert proxy.counter("denied", rule="no-destructive", app="psql") == 1
        assert proxy.counter("statements", verb="INSERT") == 0
        # The connection stays usable: a second statement in the same psql session works.
        code, out, err = await psql(proxy, f"DELETE FROM {table}", "SELECT 42", extra=["-v", "ON_ERROR_STOP=0"])
        assert "42" in out and "no-destructive" in err


async def test_statements_that_cannot_be_classified_fail_closed(pg_server: PgServer) -> None:
    """An EXECUTE of a name this connection never prepared, or text the classifier does not
    know: refused where an enforcing rule covers the session, passed to the server elsewhere."""
    covered = {**DENY_DESTRUCTIVE, "match": {**DENY_DESTRUCTIVE["match"], "apps": ["guarded"]}}
    async with pg_proxy(pg_server, [covered]) as proxy:
        for app, refused in (("guarded", True), ("other", False)):
            async with await psycopg.AsyncConnection.connect(proxy.dsn(app=app), autocommit=True) as conn:
                for sql in ("EXECUTE never_prepared", "FROBNICATE the database"):
                    with pytest.raises(psycopg.Error) as failed:
                        await conn.execute(sql)
                    if refused:  # by the proxy, in the covering rule's name
                        assert failed.value.sqlstate == "42501" and "cannot be known" in str(failed.value)
                    else:  # by the server: unknown statement name, syntax error
                        assert failed.value.sqlstate in ("26000", "42601"), failed.value.sqlstate
                assert await (await conn.execute("SELECT 7")).fetchone() == (7,)
        assert proxy.counter("denied", rule="no-destructive", app="guarded") == 2
        assert proxy.counter("denied", app="other") == 0


@pytest.mark.parametrize(
    "sql",
    [
        "DELETE FROM {t}",
        "/* hidden */ dElEtE\nFROM {t} -- comment",
        "EXPLAIN ANALYZE DELETE FROM {t}",
        "WITH d AS (DELETE FROM {t} RETURNING *) SELECT count(*) FROM d",
        "SELECT 1; DROP TABLE {t}",
        "TRUNCATE {t}",
        "DO $$BEGIN NULL; END$$; DELETE FROM {t}",
    ],
)
async def test_evasions_are_classified_and_denied(pg_server: PgServer, sql: str) -> None:
    table = await new_table(pg_server, rows=3)
    async with pg_proxy(pg_server, [DENY_DESTRUCTIVE]) as proxy:
        conn = await psycopg.AsyncConnection.connect(proxy.dsn(app="evasion"), autocommit=True)
        try:
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="no-destructive"):
                await conn.execute(sql.format(t=table))  # type: ignore[arg-type]
            assert (await (await conn.execute("SELECT 7")).fetchone()) == (7,)
        finally:
            await conn.close()
        assert await count_rows(pg_server, table) == 3


async def test_execute_counts_as_what_was_prepared(pg_server: PgServer) -> None:
    table = await new_table(pg_server, rows=3)
    async with pg_proxy(pg_server, [DENY_DESTRUCTIVE]) as proxy:
        conn = await psycopg.AsyncConnection.connect(proxy.dsn(app="prep"), autocommit=True)
        try:
            await conn.execute(f"PREPARE ins AS INSERT INTO {table} VALUES (99)")  # type: ignore[arg-type]
            await conn.execute("EXECUTE ins")
            await conn.execute(f"PREPARE del AS DELETE FROM {table}")  # type: ignore[arg-type]
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                await conn.execute("EXECUTE del")
        finally:
            await conn.close()
        assert await count_rows(pg_server, table) == 4
        assert proxy.counter("statements", app="prep", verb="INSERT") == 1


async def test_deny_inside_a_transaction_aborts_it_on_both_sides(pg_server: PgServer) -> None:
    table = await new_table(pg_server, rows=1)
    async with pg_proxy(pg_server, [DENY_DESTRUCTIVE]) as proxy:
        conn = await psycopg.AsyncConnection.connect(proxy.dsn(app="victim"))
        watcher = await direct(pg_server)
        try:
            await conn.execute(f"INSERT INTO {table} VALUES (2)")  # type: ignore[arg-type]
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
                await conn.execute(f"DELETE FROM {table}")  # type: ignore[arg-type]
            assert info.value.sqlstate == "42501"
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
            # The server agrees: the session is in an aborted transaction.
            state = await watcher.fetchval("SELECT state FROM pg_stat_activity WHERE application_name = 'victim'")
            assert state == "idle in transaction (aborted)"
            with pytest.raises(psycopg.errors.InFailedSqlTransaction):
                await conn.execute("SELECT 1")
            await conn.rollback()
            assert (await (await conn.execute(f"SELECT count(*) FROM {table}")).fetchone()) == (1,)  # type: ignore[arg-type]
        finally:
            await conn.close()
            await watcher.close()


async def test_psycopg_server_side_prepared_statements(pg_server: PgServer) -> None:
    table = await new_table(pg_server, rows=2)
    async with pg_proxy(pg_server, [DENY_DESTRUCTIVE]) as proxy:
        conn = await psycopg.AsyncConnection.connect(proxy.dsn(app="pp"), autocommit=True)
        try:
            for i in range(10):
                await conn.execute(f"INSERT INTO {table} VALUES (%s)", (i,), prepare=True)  # type: ignore[arg-type]
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                await conn.execute(f"DELETE FROM {table} WHERE a = %s", (1,), prepare=True)  # type: ignore[arg-type]
            # Still in sync: prepared and unprepared statements keep working.
            cur = await conn.execute(f"SELECT count(*) FROM {table} WHERE a >= %s", (0,), prepare=True)  # type: ignore[arg-type]
            assert await cur.fetchone() == (12,)
        finally:
            await conn.close()
        assert proxy.counter("statements", app="pp", verb="INSERT") == 10


async def test_asyncpg_extended_protocol_deny_and_transaction(pg_server: PgServer) -> None:
    table = await new_table(pg_server, rows=3)
    async with pg_proxy(pg_server, [DENY_DESTRUCTIVE]) as proxy:
        conn = await asyncpg.connect(proxy.dsn(app="apg"))
        try:
            assert await conn.fetchval(f"SELECT count(*) FROM {table} WHERE a > $1", 1) == 2
            with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError, match="no-destructive"):
                await conn.execute(f"DELETE FROM {table} WHERE a = $1", 1)
            assert await conn.fetchval("SELECT $1::int + 1", 41) == 42
            tr = conn.transaction()
            await tr.start()
            await conn.execute(f"INSERT INTO {table} VALUES ($1)", 5)
            with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
                await conn.fetch(f"DELETE FROM {table} RETURNING a")
            with pytest.raises(asyncpg.exceptions.InFailedSQLTransactionError):
                await conn.fetchval("SELECT 1")
            await tr.rollback()
            assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 3
        finally:
            await conn.close()
        assert proxy.counter("denied", app="apg") == 2
        assert proxy.counter("statements", app="apg", verb="INSERT") == 1


async def test_deny_at_execute_of_a_statement_prepared_before_the_policy(pg_server: PgServer) -> None:
    table = await new_table(pg_server, rows=3)
    async with pg_proxy(pg_server) as proxy:
        conn = await asyncpg.connect(proxy.dsn(app="late"))
        try:
            stmt = await conn.prepare(f"DELETE FROM {table} WHERE a = $1")
            await stmt.fetch(1)  # allowed: no policy yet
            await proxy.apply([DENY_DESTRUCTIVE])
            with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
                await stmt.fetch(2)
            assert await conn.fetchval("SELECT 1") == 1
        finally:
            await conn.close()
        assert await count_rows(pg_server, table) == 2


# --- time windows and rate limits ---------------------------------------------------------------------


def _window(offset_start: int, offset_end: int, zone: str) -> str:
    now = dt.datetime.now(ZoneInfo(zone))
    start, end = now + dt.timedelta(minutes=offset_start), now + dt.timedelta(minutes=offset_end)
    return f"{start:%H:%M}-{end:%H:%M}"


@pytest.mark.parametrize(("start", "end", "denied"), [(-60, 60, True), (120, 180, False)])
async def test_time_window_in_the_configured_timezone(pg_server: PgServer, start: int, end: int, denied: bool) -> None:
    zone = "Europe/Berlin"
    rule = DENY_DESTRUCTIVE | {"when": {"between": _window(start, end, zone), "timezone": zone}}
    table = await new_table(pg_server, rows=3)
    async with pg_proxy(pg_server, [rule]) as proxy:
        code, _, err = await psql(proxy, f"DELETE FROM {table} WHERE a = 1")
        assert (code != 0) == denied, err
    assert await count_rows(pg_server, table) == (3 if denied else 2)


async def test_rate_limit_over_deny_refuses_with_53400(pg_server: PgServer) -> None:
    rule = {
        "name": "cap-inserts",
        "match": {"verbs": ["INSERT"], "apps": ["capped"]},
        "action": {"rate_limit": "5/s", "burst": 5, "over": "deny"},
    }
    table = await new_table(pg_server, rows=0)
    async with pg_proxy(pg_server, [rule]) as proxy:
        conn = await asyncpg.connect(proxy.dsn(app="capped"))
        refused = 0
        try:
            for i in range(20):
                try:
                    await conn.execute(f"INSERT INTO {table} VALUES ($1)", i)
                except asyncpg.exceptions.ConfigurationLimitExceededError:
                    refused += 1
            assert await conn.fetchval("SELECT 1") == 1
        finally:
            await conn.close()
        inserted = await count_rows(pg_server, table)
        assert inserted + refused == 20
        assert 5 <= inserted <= 8  # the burst, plus what refilled while the loop ran
        assert proxy.counter("denied", rule="cap-inserts") == refused


async def test_rate_limit_over_delay_holds_statements(pg_server: PgServer) -> None:
    rule = {
        "name": "slow-inserts",
        "match": {"verbs": ["INSERT"]},
        "action": {"rate_limit": "20/s", "burst": 1, "over": "delay"},
    }
    table = await new_table(pg_server, rows=0)
    async with pg_proxy(pg_server, [rule]) as proxy:
        conn = await asyncpg.connect(proxy.dsn(app="slowed"))
        try:
            started = time.monotonic()
            for i in range(11):
                await conn.execute(f"INSERT INTO {table} VALUES ($1)", i)
            elapsed = time.monotonic() - started
        finally:
            await conn.close()
        assert elapsed >= 0.45  # 10 inserts beyond the burst at 20/s
        assert await count_rows(pg_server, table) == 11
        assert proxy.counter("delayed", rule="slow-inserts") >= 9


async def test_log_and_dry_run_are_counted_never_enforced(
    pg_server: PgServer, caplog: pytest.LogCaptureFixture
) -> None:
    rules = [
        {"name": "watch-ddl", "match": {"verbs": ["CREATE", "DROP"]}, "action": "log"},
        {"name": "rehearse", "match": {"verbs": ["DELETE"]}, "action": "dry_run"},
    ]
    table = await new_table(pg_server, rows=3)
    async with pg_proxy(pg_server, rules) as proxy:
        with caplog.at_level("INFO", logger="pointsman.sql.policy"):
            code, _, err = await psql(proxy, f"DELETE FROM {table} WHERE a = 1", f"DROP TABLE {table}")
        assert code == 0, err
        assert proxy.router.sql_stats.policy_matches.get(("rehearse", "dry_run")) == 1
        assert proxy.router.sql_stats.policy_matches.get(("watch-ddl", "log")) == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "pointsman.sql.policy"]
    assert any('"rule":"rehearse"' in line and '"verb":"DELETE"' in line for line in lines)
    assert any('"rule":"watch-ddl"' in line and f'"tables":["{table}"]' in line for line in lines)


async def test_pipeline_with_a_denied_statement_in_the_middle(pg_server: PgServer) -> None:
    """psycopg's pipeline mode: many Parse/Bind/Execute before one Sync. The statements before
    the denied one run; it and the ones after it fail as after a server error."""
    table = await new_table(pg_server, rows=0)
    async with pg_proxy(pg_server, [DENY_DESTRUCTIVE]) as proxy:
        conn = await psycopg.AsyncConnection.connect(proxy.dsn(app="piper"), autocommit=True)
        try:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                async with conn.pipeline():
                    await conn.execute(f"INSERT INTO {table} VALUES (%s)", (1,))  # type: ignore[arg-type]
                    await conn.execute(f"INSERT INTO {table} VALUES (%s)", (2,))  # type: ignore[arg-type]
                    await conn.execute(f"DELETE FROM {table} WHERE a = %s", (1,))  # type: ignore[arg-type]
                    await conn.execute(f"INSERT INTO {table} VALUES (%s)", (3,))  # type: ignore[arg-type]
            # One Sync group is one implicit transaction: the error rolls back the two INSERTs
            # before it, and the server skips the statements after it.
            async with conn.pipeline():
                cur = await conn.execute(f"SELECT count(*) FROM {table}")  # type: ignore[arg-type]
                second = await conn.execute("SELECT 2")
            assert await second.fetchone() == (2,)
            count = (await cur.fetchone() or (None,))[0]
        finally:
            await conn.close()
        assert count == await count_rows(pg_server, table) == 0
        assert proxy.counter("denied", app="piper") == 1
