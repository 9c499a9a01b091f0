"""l7: protocol-aware filters. See README.md for the data flow."""

from __future__ import annotations

from l7.classify import SqlClassifier, classify, classify_uncached
from l7.model import Statement
from l7.sql_session import PreparedStatements

__all__ = ["PreparedStatements", "SqlClassifier", "Statement", "classify", "classify_uncached"]
