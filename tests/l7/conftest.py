"""Fixtures of the l7 tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.l7.mysql_clients import _name, _sql
from tests.mysqlserver import MySqlServer


@pytest.fixture
async def table(mysql_server: MySqlServer) -> AsyncIterator[str]:
    """A fresh InnoDB table ``t_<random>(id auto, a int)`` in ``test`` holding a = 1, 2, 3."""
    name = _name()
    await _sql(
        mysql_server,
        f"CREATE TABLE {name} (id INT AUTO_INCREMENT PRIMARY KEY, a INT) ENGINE=InnoDB;"
        f"INSERT INTO {name} (a) VALUES (1), (2), (3);",
    )
    yield name
    await _sql(mysql_server, f"DROP TABLE IF EXISTS {name}")
