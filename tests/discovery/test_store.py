"""The state store contract on SqliteStore: CAS, revisions, prefix listing, watches (replay,
live, restart, compaction), leases (expiry, keepalive, revoke, restart).

Nothing here sleeps to wait for an outcome: watches are awaited with a timeout, and the only
sleeps are the passage of lease time itself (TTLs of a few hundred ms).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import pytest

from discovery.store import CasFailed, Compacted, Event, KeyValue, LeaseNotFound, StoreError
from discovery.store_sqlite import SqliteStore, _prefix_end

WAIT = 2.0  # the most any awaited outcome may take before the test fails


@pytest.fixture
async def store() -> AsyncIterator[SqliteStore]:
    async with SqliteStore(":memory:") as s:
        yield s


async def next_batch(watch: AsyncIterator[list[Event]]) -> list[Event]:
    return await asyncio.wait_for(anext(watch), WAIT)


async def collect_until(watch: AsyncIterator[list[Event]], revision: int) -> list[Event]:
    """Events from ``watch`` until one at ``revision`` or later has arrived."""
    events: list[Event] = []
    while not events or events[-1].revision < revision:
        events += await next_batch(watch)
    return events


def summary(events: list[Event]) -> list[tuple[str, str, int]]:
    return [(e.type, e.kv.key, e.revision) for e in events]


# -- revisions, versions, CAS ----------------------------------------------------------------


async def test_put_get_revisions_and_versions(store: SqliteStore) -> None:
    assert store.revision == 0
    assert await store.get("a") is None
    assert await store.put("a", b"1") == 1
    assert await store.put("b", b"x") == 2
    assert await store.put("a", b"2") == 3
    assert await store.get("a") == KeyValue("a", b"2", create_revision=1, mod_revision=3, version=2, lease=None)
    assert store.revision == 3
    assert await store.delete("a") == 4
    assert await store.delete("a") is None  # nothing to delete: no revision spent
    assert store.revision == 4
    assert await store.put("a", b"3") == 5  # re-created: a new life, version starts over
    assert await store.get("a") == KeyValue("a", b"3", 5, 5, 1, None)
    assert await store.put("a", b"") == 6
    assert (await store.get("a")) == KeyValue("a", b"", 5, 6, 2, None)


async def test_cas_create_only(store: SqliteStore) -> None:
    rev = await store.put("k", b"v1", expect_revision=0)
    with pytest.raises(CasFailed) as info:
        await store.put("k", b"v2", expect_revision=0)
    assert (info.value.key, info.value.expected, info.value.actual) == ("k", 0, rev)
    assert store.revision == rev  # a failed CAS writes nothing
    assert (await store.get("k")) == KeyValue("k", b"v1", rev, rev, 1, None)


async def test_cas_update(store: SqliteStore) -> None:
    r1 = await store.put("k", b"v1")
    r2 = await store.put("k", b"v2", expect_revision=r1)
    with pytest.raises(CasFailed) as info:  # a second writer that read r1 loses
        await store.put("k", b"v3", expect_revision=r1)
    assert (info.value.expected, info.value.actual) == (r1, r2)
    with pytest.raises(CasFailed) as info:
        await store.put("missing", b"x", expect_revision=r1)
    assert info.value.actual == 0
    assert store.revision == r2
    assert (await store.get("k")) is not None
    assert (await store.get("missing")) is None


async def test_cas_delete(store: SqliteStore) -> None:
    r1 = await store.put("k", b"v1")
    r2 = await store.put("k", b"v2")
    with pytest.raises(CasFailed) as info:
        await store.delete("k", expect_revision=r1)
    assert info.value.actual == r2
    with pytest.raises(CasFailed):
        await store.delete("k", expect_revision=0)
    assert await store.delete("k", expect_revision=r2) == r2 + 1
    with pytest.raises(CasFailed):
        await store.delete("k", expect_revision=r2)
    assert await store.delete("k", expect_revision=0) is None  # "must not exist": holds, nothing to do


async def test_bad_arguments(store: SqliteStore) -> None:
    with pytest.raises(ValueError):
        await store.put("", b"x")
    with pytest.raises(TypeError):
        await store.put("k", "text")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await store.grant(0)
    with pytest.raises(ValueError):
        store.watch("", 0)
    assert store.revision == 0


# -- list and delete_prefix ------------------------------------------------------------------


async def test_list_by_prefix_sorted_with_revision(store: SqliteStore) -> None:
    for key in ["svc/b/2", "svc/a/1", "svc/b/1", "svc0", "svc", "sv", "other/x", "svc/\U0010ffff"]:
        await store.put(key, key.encode())
    items, rev = await store.list("svc/")
    assert [kv.key for kv in items] == ["svc/a/1", "svc/b/1", "svc/b/2", "svc/\U0010ffff"]
    assert rev == store.revision == 8
    assert [kv.key for kv in (await store.list("svc/b/"))[0]] == ["svc/b/1", "svc/b/2"]
    assert [kv.key for kv in (await store.list("svc"))[0]][:2] == ["svc", "svc/a/1"]
    assert len((await store.list(""))[0]) == 8
    assert (await store.list("nope/"))[0] == []
    assert [kv.key for kv in (await store.list("svc/\U0010ffff"))[0]] == ["svc/\U0010ffff"]


def test_prefix_end() -> None:
    assert _prefix_end("a/") == "a0"
    assert _prefix_end("") is None
    assert _prefix_end("a\U0010ffff") == "b"
    assert _prefix_end("\U0010ffff") is None
    assert _prefix_end("\ud7ff") == "\ue000"


async def test_delete_prefix_is_one_revision(store: SqliteStore) -> None:
    for key in ["s/a", "s/b", "s/c", "t/a"]:
        await store.put(key, b"")
    watch = store.watch("", store.revision + 1)
    rev = await store.delete_prefix("s/")
    assert rev == 5
    assert summary(await next_batch(watch)) == [("delete", "s/a", 5), ("delete", "s/b", 5), ("delete", "s/c", 5)]
    assert [kv.key for kv in (await store.list(""))[0]] == ["t/a"]
    assert await store.delete_prefix("s/") is None
    assert store.revision == 5


# -- watch -----------------------------------------------------------------------------------


async def test_watch_replays_history_then_live(store: SqliteStore) -> None:
    await store.put("a/1", b"1")
    await store.put("b/1", b"x")
    await store.put("a/2", b"2")
    await store.delete("a/1")
    watch = store.watch("a/", 1)
    replay = await next_batch(watch)
    assert summary(replay) == [("put", "a/1", 1), ("put", "a/2", 3), ("delete", "a/1", 4)]
    assert replay[0].kv == KeyValue("a/1", b"1", 1, 1, 1, None)
    assert replay[2].kv == KeyValue("a/1", b"", 0, 4, 0, None)  # etcd's shape of a delete event
    await store.put("b/2", b"")  # another prefix: not seen
    await store.put("a/2", b"two")
    live = await next_batch(watch)
    assert summary(live) == [("put", "a/2", 6)]
    assert live[0].kv == KeyValue("a/2", b"two", 3, 6, 2, None)


async def test_watch_from_none_and_from_the_future(store: SqliteStore) -> None:
    await store.put("a", b"")
    now = store.watch("")  # only what happens from here on
    later = store.watch("", 4)  # a revision that does not exist yet
    await store.put("a", b"")  # 2
    assert summary(await next_batch(now)) == [("put", "a", 2)]
    await store.put("a", b"")  # 3
    await store.put("a", b"")  # 4
    assert summary(await next_batch(later)) == [("put", "a", 4)]


async def test_list_then_watch_from_its_revision_has_no_gap_or_overlap(store: SqliteStore) -> None:
    await store.put("a", b"")
    _, rev = await store.list("")
    watch = store.watch("", rev + 1)
    await store.put("b", b"")
    assert summary(await next_batch(watch)) == [("put", "b", rev + 1)]


async def test_watch_from_old_revision_while_writes_continue() -> None:
    """The replay, the catching up and the live tail are one stream: every revision exactly
    once, in order, even with small batches and a writer that never stops."""
    async with SqliteStore(":memory:", watch_batch=7) as store:
        for i in range(50):
            await store.put(f"k/{i % 5}", str(i).encode())
        total = 400

        async def writer() -> None:
            for i in range(50, total):
                if i % 10 == 0:
                    await store.delete(f"k/{i % 5}")
                else:
                    await store.put(f"k/{i % 5}", str(i).encode())
                await asyncio.sleep(0)

        task = asyncio.create_task(writer())
        batches: list[list[Event]] = []
        behind: list[int] = []  # how far the store was ahead of each batch when it arrived
        async for batch in store.watch("k/", 1):
            batches.append(batch)
            behind.append(store.revision - batch[-1].revision)
            await asyncio.sleep(0)  # a consumer that takes its time
            if batch[-1].revision == total:
                break
        await task
        revisions = [e.revision for b in batches for e in b]
        assert revisions == list(range(1, total + 1))
        assert all(len({e.revision for e in b}) <= 7 for b in batches)
        assert max(behind) > 0 and behind.count(0) > 10  # it did replay, then followed live


async def test_batches_never_split_a_revision() -> None:
    async with SqliteStore(":memory:", watch_batch=1) as store:
        for key in ["p/a", "p/b", "p/c"]:
            await store.put(key, b"")
        await store.delete_prefix("p/")
        watch = store.watch("p/", 1)
        batches = [await next_batch(watch) for _ in range(4)]
        assert [len(b) for b in batches] == [1, 1, 1, 3]


async def test_concurrent_watchers(store: SqliteStore) -> None:
    await store.put("a/0", b"")
    all_ = store.watch("", 1)
    only_a = store.watch("a/", 1)
    only_b = store.watch("b/")
    results = await asyncio.gather(
        collect_until(all_, 5),
        collect_until(only_a, 4),
        collect_until(only_b, 5),
        *(store.put(k, b"") for k in ["a/1", "b/1", "a/2", "b/2"]),
    )
    seen = [cast(list[Event], r) for r in results[:3]]
    assert [e.revision for e in seen[0]] == [1, 2, 3, 4, 5]
    assert summary(seen[1]) == [("put", "a/0", 1), ("put", "a/1", 2), ("put", "a/2", 4)]
    assert summary(seen[2]) == [("put", "b/1", 3), ("put", "b/2", 5)]


async def test_close_ends_watchers() -> None:
    store = SqliteStore(":memory:")
    await store.start()
    await store.put("a", b"")
    seen: list[Event] = []

    async def follow() -> None:
        async for batch in store.watch("", 1):
            seen.extend(batch)

    tasks = [asyncio.create_task(follow()) for _ in range(3)]
    await asyncio.sleep(0.01)
    await store.close()
    await asyncio.wait_for(asyncio.gather(*tasks), WAIT)  # they return: no error, no hang
    assert len(seen) == 3
    with pytest.raises(StoreError):
        await store.put("a", b"")
    with pytest.raises(StoreError):
        store.watch("")
    await store.close()  # idempotent


async def test_cancelling_a_watcher_leaves_the_store_working(store: SqliteStore) -> None:
    async def follow() -> None:
        async for _ in store.watch(""):
            pass

    task = asyncio.create_task(follow())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    watch = store.watch("")
    async with contextlib.aclosing(watch):  # breaking out of a watch: close it
        await store.put("a", b"")
        assert summary(await next_batch(watch)) == [("put", "a", 1)]
    await store.put("a", b"")
    assert store.revision == 2


# -- compaction ------------------------------------------------------------------------------


async def test_compact_and_compacted(store: SqliteStore) -> None:
    for i in range(6):
        await store.put("k", str(i).encode())
    await store.compact(4)
    with pytest.raises(Compacted) as info:
        await anext(store.watch("", 3))
    assert (info.value.requested, info.value.compact_revision) == (3, 4)
    assert [e.revision for e in await next_batch(store.watch("", 4))] == [4, 5, 6]
    await store.compact(2)  # already compacted past: nothing to do
    assert store.compact_revision == 4
    with pytest.raises(ValueError):
        await store.compact(7)
    assert (await store.get("k")) == KeyValue("k", b"5", 1, 6, 6, None)  # keys are untouched


async def test_automatic_compaction_keeps_the_last_revisions() -> None:
    async with SqliteStore(":memory:", history=10) as store:
        for i in range(30):
            await store.put(f"k/{i % 3}", b"")
        assert 10 <= store.revision - store.compact_revision + 1 <= 11
        with pytest.raises(Compacted):
            await anext(store.watch("", 1))
        kept = await next_batch(store.watch("", store.compact_revision))
        assert [e.revision for e in kept] == list(range(store.compact_revision, 31))


async def test_a_watcher_that_falls_behind_compaction_gets_compacted() -> None:
    async with SqliteStore(":memory:", history=5, watch_batch=2) as store:
        for _ in range(4):
            await store.put("k", b"")
        watch = store.watch("", 1)
        assert [e.revision for e in await next_batch(watch)] == [1, 2]
        for _ in range(10):  # meanwhile history moves on past revision 3
            await store.put("k", b"")
        with pytest.raises(Compacted) as info:
            await next_batch(watch)
        assert info.value.requested == 3


# -- leases ----------------------------------------------------------------------------------


async def test_lease_expiry_deletes_its_keys_with_events(store: SqliteStore) -> None:
    started = time.monotonic()
    lease = await store.grant(0.2)
    await store.put("h/a", b"", lease=lease)
    await store.put("h/b", b"", lease=lease)
    await store.put("h/c", b"")  # on no lease: stays
    assert (await store.get("h/a")) == KeyValue("h/a", b"", 1, 1, 1, lease)
    watch = store.watch("h/", store.revision + 1)
    events = await next_batch(watch)
    elapsed = time.monotonic() - started
    assert summary(events) == [("delete", "h/a", 4), ("delete", "h/b", 4)]  # one write, as etcd
    assert 0.2 <= elapsed < 0.2 + 0.3  # the reaper aims at the deadline; slack for a busy CI machine
    assert [kv.key for kv in (await store.list("h/"))[0]] == ["h/c"]
    with pytest.raises(LeaseNotFound):
        await store.keepalive(lease)
    with pytest.raises(LeaseNotFound):
        await store.put("h/a", b"", lease=lease)


async def test_keepalive_keeps_the_lease(store: SqliteStore) -> None:
    lease = await store.grant(0.2)
    await store.put("h/a", b"", lease=lease)
    for _ in range(5):  # 0.4 s in all: twice the ttl
        await asyncio.sleep(0.08)
        await store.keepalive(lease)
    assert (await store.get("h/a")) is not None
    watch = store.watch("h/")
    assert summary(await next_batch(watch)) == [("delete", "h/a", 2)]


async def test_a_lease_past_its_deadline_is_dead_before_the_reaper_runs(store: SqliteStore) -> None:
    lease = await store.grant(0.05)
    time.sleep(0.08)  # blocks the loop: the expiry task cannot have run
    with pytest.raises(LeaseNotFound):
        await store.keepalive(lease)
    with pytest.raises(LeaseNotFound):
        await store.put("k", b"", lease=lease)


async def test_revoke(store: SqliteStore) -> None:
    lease = await store.grant(10)
    other = await store.grant(10)
    assert other != lease
    await store.put("h/a", b"", lease=lease)
    await store.put("h/b", b"", lease=other)
    await store.put("h/c", b"", lease=lease)
    await store.put("h/c", b"")  # a put without lease takes the key off the lease
    assert await store.revoke(lease) == 5
    assert [kv.key for kv in (await store.list(""))[0]] == ["h/b", "h/c"]
    with pytest.raises(LeaseNotFound):
        await store.revoke(lease)
    with pytest.raises(LeaseNotFound):
        await store.keepalive(lease)
    with pytest.raises(LeaseNotFound):
        await store.revoke(12345)
    empty = await store.grant(10)
    assert await store.revoke(empty) is None  # no keys: no revision spent
    assert store.revision == 5
    assert empty not in (lease, other)


# -- restart ---------------------------------------------------------------------------------


async def test_restart_keeps_data_revision_and_history(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    async with SqliteStore(path) as store:
        await store.put("a", b"1")
        await store.put("b", b"2")
        seen = store.revision  # a watcher got this far, then the process went away
        await store.put("a", b"3")
        await store.delete("b")
    async with SqliteStore(path) as store:
        assert store.revision == 4
        assert (await store.get("a")) == KeyValue("a", b"3", 1, 3, 2, None)
        watch = store.watch("", seen + 1)
        assert summary(await next_batch(watch)) == [("put", "a", 3), ("delete", "b", 4)]
        assert await store.put("c", b"") == 5
        assert summary(await next_batch(watch)) == [("put", "c", 5)]
    async with SqliteStore(path) as store:
        assert [e.revision for e in await next_batch(store.watch("", 1))] == [1, 2, 3, 4, 5]


async def test_restart_keeps_compaction(tmp_path: Path) -> None:
    async with SqliteStore(tmp_path / "s.db") as store:
        for _ in range(5):
            await store.put("k", b"")
        await store.compact(3)
    async with SqliteStore(tmp_path / "s.db") as store:
        with pytest.raises(Compacted):
            await anext(store.watch("", 2))


async def test_leases_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    async with SqliteStore(path) as store:
        lease = await store.grant(0.4)
        await store.put("h/a", b"", lease=lease)
    async with SqliteStore(path) as store:
        assert (await store.get("h/a")) == KeyValue("h/a", b"", 1, 1, 1, lease)
        await store.keepalive(lease)
        renewed = time.monotonic()
        new = await store.grant(1)
        assert new != lease  # ids are never reused, across restarts too
        watch = store.watch("h/")
        assert summary(await next_batch(watch)) == [("delete", "h/a", 2)]
        assert time.monotonic() - renewed > 0.3


async def test_a_lease_that_ran_out_while_stopped_expires_at_start(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    async with SqliteStore(path) as store:
        lease = await store.grant(0.1)
        await store.put("h/a", b"", lease=lease)
        await store.put("h/b", b"")
    await asyncio.sleep(0.15)
    async with SqliteStore(path) as store:
        watch = store.watch("h/", 3)
        assert summary(await next_batch(watch)) == [("delete", "h/a", 3)]
        assert [kv.key for kv in (await store.list("h/"))[0]] == ["h/b"]
        with pytest.raises(LeaseNotFound):
            await store.keepalive(lease)


# -- ownership and lifecycle -----------------------------------------------------------------


async def test_one_owner_per_file(tmp_path: Path) -> None:
    async with SqliteStore(tmp_path / "s.db") as store:
        await store.put("a", b"")
        with pytest.raises(StoreError, match="in use"):
            await SqliteStore(tmp_path / "s.db").start()
    async with SqliteStore(tmp_path / "s.db") as store:  # released on close
        assert store.revision == 1


async def test_not_started() -> None:
    store = SqliteStore(":memory:")
    with pytest.raises(StoreError, match="not started"):
        await store.get("a")
    await store.close()
    with pytest.raises(StoreError, match="closed"):
        await store.start()


async def test_a_failed_write_changes_nothing(store: SqliteStore) -> None:
    await store.put("k", b"1")
    lease = await store.grant(10)
    await store.put("k2", b"", lease=lease)
    before = await store.list("")
    with pytest.raises(LeaseNotFound):
        await store.put("k", b"2", lease=999)
    with pytest.raises(CasFailed):
        await store.delete("k", expect_revision=99)
    assert await store.list("") == before
    watch = store.watch("", 1)
    assert [e.revision for e in await next_batch(watch)] == [1, 2]


async def test_a_write_that_fails_midway_is_rolled_back_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """kv change, event row and revision bump are one transaction: a failure after the first
    two (here: in the automatic compaction) leaves all three as they were."""
    async with SqliteStore(":memory:", history=1) as store:  # the third write compacts
        await store.put("k", b"1")
        await store.put("k", b"2")

        def broken(db: object, revision: int) -> None:
            raise sqlite3.OperationalError("disk I/O error")

        monkeypatch.setattr(SqliteStore, "_drop_history", staticmethod(broken))
        with pytest.raises(StoreError, match="disk I/O error"):  # SQLite's error, as the contract's
            await store.put("k", b"3")
        assert store.revision == 2
        assert (await store.get("k")) == KeyValue("k", b"2", 1, 2, 2, None)
        assert [e.revision for e in await next_batch(store.watch("", 1))] == [1, 2]
        monkeypatch.undo()
        assert await store.put("k", b"3") == 3


CRASHING_WRITER = """
import asyncio, sys
from discovery.store_sqlite import SqliteStore

async def main():
    store = SqliteStore(sys.argv[1], history=10**9)
    await store.start()
    lease = await store.grant(60)
    i = 0
    while True:  # until SIGKILL, most likely in the middle of a write
        key = f"k/{i % 37}"
        if i % 7 == 0:
            await store.delete(key)
        elif i % 11 == 0:
            await store.delete_prefix(f"k/{i % 3}")
        else:
            await store.put(key, str(i).encode(), lease=lease if i % 2 else None)
        i += 1
        if i == 300:
            print("writing", flush=True)

asyncio.run(main())
"""


async def test_killed_mid_write_the_revision_data_and_history_agree(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CRASHING_WRITER,
        str(path),
        stdout=asyncio.subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.stdout is not None
    assert await asyncio.wait_for(proc.stdout.readline(), 10) == b"writing\n"
    await asyncio.sleep(0.05)
    proc.kill()
    await proc.wait()
    async with SqliteStore(path) as store:
        replayed: dict[str, KeyValue] = {}
        last = 0
        async for batch in store.watch("", 1):
            for event in batch:
                if event.type == "put":
                    replayed[event.kv.key] = event.kv
                else:
                    del replayed[event.kv.key]
                last = event.revision
            if last == store.revision:
                break
        assert last == store.revision > 300
        items, _ = await store.list("")
        assert items == sorted(replayed.values(), key=lambda kv: kv.key)
