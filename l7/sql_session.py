"""Per-connection SQL state the digest cache cannot hold: what each prepared name means.

``EXECUTE p`` is classified by the digest as verb EXECUTE with name ``p``; what it *does* is
whatever ``p`` was prepared as on this connection, earlier (SQL ``PREPARE``) or through the
extended protocol (a Parse message: the decoder calls :meth:`PreparedStatements.prepare`).
:meth:`observe` walks a query's statements in order, so ``PREPARE p AS DELETE ...; EXECUTE p``
in one simple query resolves too. An EXECUTE of an unknown name stays verb EXECUTE with no
``inner``; a blocking policy should treat that as unknown and fail closed.

PostgreSQL prepared statements are not transactional (a ROLLBACK does not undo PREPARE), so
none of this tracks transactions. A PREPARE the server then rejects is still recorded: the
mistake can only over-report. The map is bounded; past the bound the oldest name is
forgotten, which again can only turn a later EXECUTE into "unknown".
"""

from __future__ import annotations

from dataclasses import replace

from l7.model import Statement


class PreparedStatements:
    """Prepared-statement names of one connection, mapped to what they were prepared as."""

    def __init__(self, limit: int = 1024) -> None:
        self.limit = limit
        self._by_name: dict[str, Statement] = {}

    def prepare(self, name: str, statement: Statement) -> None:
        by_name = self._by_name
        by_name.pop(name, None)
        by_name[name] = statement
        if len(by_name) > self.limit:
            del by_name[next(iter(by_name))]

    def deallocate(self, name: str | None) -> None:
        """Forget ``name``; ``None`` forgets all (DEALLOCATE ALL, DISCARD ALL)."""
        if name is None:
            self._by_name.clear()
        else:
            self._by_name.pop(name, None)

    def get(self, name: str) -> Statement | None:
        return self._by_name.get(name)

    def resolve(self, stmt: Statement) -> Statement:
        """EXECUTE p -> p's verb, tables and verbs (EXECUTE kept in ``verbs`` and ``command``)."""
        if stmt.verb != "EXECUTE" or stmt.name is None:
            return stmt
        target = self._by_name.get(stmt.name)
        if target is None:
            return stmt
        return replace(stmt, verb=target.verb, tables=target.tables, verbs=(*target.verbs, "EXECUTE"), inner=target)

    def observe(self, statements: list[Statement]) -> list[Statement]:
        """Update the map from PREPARE/DEALLOCATE and resolve EXECUTE, in statement order."""
        out = []
        for st in statements:
            if st.verb == "PREPARE" and st.name is not None:
                if st.inner is not None:
                    self.prepare(st.name, st.inner)
                else:
                    # PREPARE s FROM @var: unknown text. Forget the old meaning of s, or an
                    # EXECUTE would resolve to whatever s was prepared as before.
                    self.deallocate(st.name)
            elif st.verb == "DEALLOCATE":
                self.deallocate(None if st.object_kind == "ALL" else st.name)
            elif st.verb == "DISCARD" and "ALL" in st.digest.split():
                self.deallocate(None)
            out.append(self.resolve(st))
        return out

    def __len__(self) -> int:
        return len(self._by_name)
