"""Micro-benchmark of SQL statement classification: us per statement, three paths.

    .venv/bin/python bench/classify.py [--rounds N]

* cached:   SqlClassifier.classify on pgbench-like statements whose literals change every
            call (lex + digest + LRU hit): what the proxy pays per statement in steady state;
* uncached: classify_uncached (lex + digest + token rules): the cost of a cache miss;
* lex only: split() alone, to show how much of the cached path is the lexer;
* sqlparse: sqlparse.parse() + get_type(), the reference, if installed (test extra).

Each path runs the same statement mix; the best of 3 rounds is reported (the machine may be
shared, and the minimum is the least disturbed estimate).
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable

from l7.classify import SqlClassifier, classify_uncached
from l7.sql_lexer import split

TEMPLATES = [
    # pgbench's TPC-B-like transaction
    "UPDATE pgbench_accounts SET abalance = abalance + {d} WHERE aid = {a};",
    "SELECT abalance FROM pgbench_accounts WHERE aid = {a};",
    "UPDATE pgbench_tellers SET tbalance = tbalance + {d} WHERE tid = {t};",
    "UPDATE pgbench_branches SET bbalance = bbalance + {d} WHERE bid = {b};",
    "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ({t}, {b}, {a}, {d}, CURRENT_TIMESTAMP);",
    # an ORM-ish query with a sqlcommenter comment, a join and an IN list
    "/* app='shop',route='/cart' */ SELECT o.id, o.total, c.name FROM orders o JOIN customers c ON c.id = o.cid "
    "WHERE o.status IN ('new', 'paid', 'sent') AND o.created > '2026-01-{d2}' ORDER BY o.id DESC LIMIT 50",
    "WITH d AS (DELETE FROM sessions WHERE expires < now() - interval '{d2} days' RETURNING id) SELECT count(*) FROM d",
    "BEGIN",
    "COMMIT",
]


def statements(n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    out = []
    for k in range(n):
        t = TEMPLATES[k % len(TEMPLATES)]
        out.append(
            t.format(
                a=rng.randrange(1, 10**6),
                b=rng.randrange(1, 10),
                t=rng.randrange(1, 100),
                d=rng.randrange(-5000, 5000),
                d2=rng.randrange(10, 28),
            )
        )
    return out


def measure(fn: Callable[[str], object], sqls: list[str], rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for s in sqls:
            fn(s)
        best = min(best, time.perf_counter() - t0)
    return best / len(sqls) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--statements", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    sqls = statements(args.statements)
    clf = SqlClassifier()
    clf.classify(sqls[0])
    rows = [
        ("cached (lex + digest + LRU hit)", measure(clf.classify, sqls, args.rounds)),
        ("uncached (lex + rules)", measure(classify_uncached, sqls, args.rounds)),
        ("lex only (split)", measure(split, sqls, args.rounds)),
    ]
    try:
        import sqlparse
    except ImportError:
        rows.append(("sqlparse parse + get_type", float("nan")))
    else:
        few = sqls[: max(len(TEMPLATES) * 20, args.statements // 10)]

        def ref(s: str) -> object:
            return [x.get_type() for x in sqlparse.parse(s)]

        rows.append(("sqlparse parse + get_type", measure(ref, few, args.rounds)))
    print(f"{len(sqls)} statements, {len(TEMPLATES)} templates, best of {args.rounds} rounds")
    print(f"cache: {clf.cache.hits} hits, {clf.cache.misses} misses, {len(clf.cache)} entries")
    width = max(len(name) for name, _ in rows)
    for name, us in rows:
        print(f"  {name:<{width}}  {us:8.1f} us/statement")
    per_template = {}
    for t_sql in statements(len(TEMPLATES)):
        per_template[t_sql[:48]] = measure(classify_uncached, [t_sql] * 200, args.rounds)
    print("uncached, per template:")
    for name, us in per_template.items():
        print(f"  {name:<48}  {us:8.1f} us")


if __name__ == "__main__":
    main()
