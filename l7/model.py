"""Shared types of the l7 package."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Dialect = Literal["postgres", "mysql"]

# Precedence of verbs when one statement performs several (a data-modifying CTE, or
# EXPLAIN ANALYZE): the most destructive wins, so a policy that looks only at ``verb`` is never
# weaker than one that looks at ``verbs``. MERGE ranks first because it can insert, update and
# delete; DELETE outranks UPDATE (loses rows); MySQL REPLACE deletes then inserts; UPDATE
# outranks INSERT (changes existing rows).
VERB_PRECEDENCE: tuple[str, ...] = ("MERGE", "DELETE", "REPLACE", "UPDATE", "INSERT", "SELECT")


@dataclass(frozen=True, slots=True)
class Statement:
    """The classification of one SQL statement.

    ``verb`` is what the statement *does*, for policy: ``EXPLAIN ANALYZE DELETE`` is DELETE
    (ANALYZE runs it), ``WITH d AS (DELETE ...) SELECT`` is DELETE (see VERB_PRECEDENCE),
    ``SELECT ... INTO t`` is CREATE (object_kind TABLE, it creates ``t``), ``START TRANSACTION``
    is BEGIN, ``END``/``COMMIT PREPARED`` is COMMIT, ``ABORT`` is ROLLBACK, MySQL ``DESCRIBE`` is
    EXPLAIN, MySQL ``LOAD DATA`` is LOAD (object_kind DATA). Unrecognised text is OTHER.
    ``command`` is the leading keyword as written (EXPLAIN, WITH, EXECUTE, ...).
    """

    verb: str
    tables: tuple[str, ...] = ()  # schema.table; unquoted names lower-cased, quoted kept
    digest: str = ""
    command: str = ""
    verbs: tuple[str, ...] = ()  # every verb performed, strongest first
    object_kind: str | None = None  # CREATE/ALTER/DROP/GRANT target kind: TABLE, INDEX, ...
    direction: str | None = None  # COPY FROM/TO, LOAD DATA: FROM, SELECT INTO OUTFILE: TO
    name: str | None = None  # prepared statement (PREPARE/EXECUTE/DEALLOCATE), SET parameter
    inner: Statement | None = None  # PREPARE/EXPLAIN/DECLARE body; EXECUTE once resolved

    @property
    def is_known(self) -> bool:
        return self.verb != "OTHER"


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is on the client side of a connection, as far as it is known: the labels that SQL
    and HTTP series carry (``app``, ``version``, ``instance``, ``node``).

    Known fully for an instance the scheduler placed (from its sidecar listener, or from the
    placement table when the instance has an address of its own); otherwise only ``app`` is
    known (a listener's configured ``app``, PostgreSQL's ``application_name``, the user) and
    the rest are empty strings, which Prometheus treats as absent labels."""

    app: str
    version: str = ""
    instance: str = ""
    node: str = ""
    # The app is only what the client says it is (application_name, program_name, its user):
    # any number of distinct values can arrive, so as a label it is bounded (SqlMetrics.app_label).
    claimed: bool = False

    def labels(self) -> tuple[str, str, str, str]:
        return (self.app, self.version, self.instance, self.node)


# The label names of Identity.labels(), in order; every series keyed by identity uses these.
IDENTITY_LABELS: tuple[str, str, str, str] = ("app", "version", "instance", "node")
